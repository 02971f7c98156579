"""The `context` channel: the receiver reads every sender's private document in its own prompt and
answers, with no sender turn (the single agent with the documents, the first baseline a user tries).
Trained (`context trained`), with its own receiver LoRA: the control for "the channel only reads
the documents better"."""

from __future__ import annotations

from tflow.agents.encoding import prompt_length
from tflow.agents.generation import generate
from tflow.channels.controls import control_part, trained_receiver
from tflow.channels.ledger import Stages, generated_usage
from tflow.channels.registry import Call, Channel, register
from tflow.reply import Reply, Usage


def context_turn(query: str, documents: dict[str, str]) -> str:
    """The receiver's user turn: the query, then each sender's document under its name."""
    shown = {name: text for name, text in documents.items() if text}
    if not shown:
        return query
    notes = "\n".join(f"[{name}]: {text}" for name, text in shown.items())
    return f"{query}\n\nDocuments from your team:\n{notes}"


def documents(call: Call, q: int) -> dict[str, str]:
    """Query q's document of every sender (its own `context` where the call gives none)."""
    return {name: call.context(s, q) or sender.context for s, (name, sender)
            in enumerate(zip(call.names, call.senders, strict=True))}


def run(call: Call) -> list[Reply]:
    receiver = call.receiver
    stages = Stages(call.senders, receiver)
    prompts = [receiver.prompt(context_turn(query, documents(call, q))) for q, query in enumerate(call.queries)]
    with stages("receiver"), trained_receiver(receiver, "context"):
        out = generate(receiver.model, receiver.tokenizer, prompts, call.settings, **call.decode)
    return [Reply(text, "context", Usage({receiver.name: generated_usage(receiver, out, q)}), **stages.measured,
                  finish_reason=out.finish_reasons[q]) for q, text in enumerate(out.texts)]


def receiver_turns(team, queries: list[str], contexts: list[dict[str, str]]) -> list[str]:
    """The user turns the receiver reads on the context channel (what its trained control learns on)."""
    return [context_turn(q, {s.name: c.get(s.name) or s.context for s in team.senders})
            for q, c in zip(queries, contexts, strict=True)]


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """The receiver alone reads its prompt with every document in it."""
    receiver = team.receiver
    turn = receiver_turns(team, [query], [contexts])[0]
    return [(receiver, prompt_length(receiver, receiver.prompt(turn)), max_tokens)]


CHANNEL = register(Channel("context", run, context_use, part=control_part("context", receiver_turns)))
