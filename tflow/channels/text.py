"""The `text` channel (TextMAS): senders write messages in turn, the receiver reads them all.

Senders read their role prefix from kept states (tflow.agents.prefix), as the weights channel's senders
do, so the two channels' senders pay the same for the role."""

from __future__ import annotations

from pydantic import Field

from tflow.agents.encoding import prompt_length, token_ids
from tflow.agents.generation import generate
from tflow.agents.prefix import prefix_text
from tflow.channels.controls import control_part, trained_receiver
from tflow.channels.dispatch import batched_calls
from tflow.channels.ledger import Stages, generated_usage, token_id_bytes
from tflow.channels.registry import Call, Channel, register
from tflow.config.base import Section
from tflow.reply import AgentUsage, Reply, Usage


def run(call: Call) -> list[Reply]:
    senders, receiver, queries = call.senders, call.receiver, call.queries
    stages = Stages(senders, receiver)
    with stages("senders"):
        messages, ledgers = write_messages(call)
    with stages("receiver"), trained_receiver(receiver, "text"):
        prompts = [receiver.prompt(text_turn(q, m)) for q, m in zip(queries, messages, strict=True)]
        out = generate(receiver.model, receiver.tokenizer, prompts, call.settings, **call.decode)
    replies = []
    for q, text in enumerate(out.texts):
        ledgers[q][receiver.name] = generated_usage(receiver, out, q)
        sent = sum(len(ids) for ids in token_ids(receiver.tokenizer, list(messages[q].values())))
        nbytes = sent * token_id_bytes(receiver.tokenizer)
        replies.append(Reply(text, "text", Usage(ledgers[q]), message_bytes=nbytes, messages=dict(messages[q]),
                             **stages.measured, finish_reason=out.finish_reasons[q]))
    return replies


def write_messages(call: Call) -> tuple[list[dict[str, str]], list[dict[str, AgentUsage]]]:
    """Every sender's message to every query, each sender reading the earlier ones: per query
    {sender: message}, and per query {sender: its ledger entry}."""
    messages: list[dict[str, str]] = [{} for _ in call.queries]
    ledgers: list[dict[str, AgentUsage]] = [{} for _ in call.queries]
    for s, sender in enumerate(call.senders):
        prompts = [sender.prompt(text_turn(q, m), call.context(s, i))
                   for i, (q, m) in enumerate(zip(call.queries, messages, strict=True))]
        out = generate(sender.model, sender.tokenizer, prompts, call.settings,
                       max_new_tokens=call.options["message_tokens"], reuse=prefix_text(sender))
        for q, text in enumerate(out.texts):
            messages[q][call.names[s]] = text
            ledgers[q][call.names[s]] = generated_usage(sender, out, q)
    return messages, ledgers


def receiver_turns(team, queries: list[str], contexts: list[dict[str, str]]) -> list[str]:
    """The user turns the receiver reads on the text channel (what its trained control learns on)."""
    call = next(batched_calls(team.senders, team.receiver, queries, contexts, len(queries),
                              {"message_tokens": team.recipe.generate.message_tokens}))
    return [text_turn(q, m) for q, m in zip(queries, write_messages(call)[0], strict=True)]


def text_turn(query: str, messages: dict[str, str]) -> str:
    """The user turn of the text channel: the query, then each earlier message under its author."""
    if not messages:
        return query
    notes = "\n".join(f"[{name}]: {text}" for name, text in messages.items())
    return f"{query}\n\nMessages from your team:\n{notes}"


class TextOptions(Section):
    """How long the text channel's messages may be; `communicate(..., channel="text")` takes these."""

    message_tokens: int = Field(256, gt=0)
    """Most tokens each sender's message may have (the recipe's `generate.message_tokens`)."""


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """The receiver reads its prompt (the messages come on top) and every sender writes a message."""
    receiver = team.receiver
    return [(receiver, prompt_length(receiver, receiver.prompt(query)), max_tokens),
            *((s, prompt_length(s, s.prompt(query, contexts.get(s.name))), options["message_tokens"])
              for s in team.senders)]


CHANNEL = register(Channel("text", run, context_use, options=TextOptions, part=control_part("text", receiver_turns),
                           settings=lambda recipe: {"message_tokens": recipe.generate.message_tokens}))
