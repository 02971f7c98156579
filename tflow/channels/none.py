"""The `none` channel: the receiver answers alone (the single-agent baseline); trained, with its own
receiver LoRA (`none trained`), the control that shows what training alone buys."""

from __future__ import annotations

from tflow.agents.encoding import prompt_length
from tflow.agents.generation import generate
from tflow.channels.controls import control_part, trained_receiver
from tflow.channels.ledger import Stages, agent_usage
from tflow.channels.registry import Call, Channel, register
from tflow.reply import Reply, Usage


def run(call: Call) -> list[Reply]:
    receiver = call.receiver
    stages = Stages(call.senders, receiver)
    with stages("receiver"), trained_receiver(receiver, "none"):
        out = generate(receiver.model, receiver.tokenizer, [receiver.prompt(q) for q in call.queries], call.settings,
                       **call.decode)
    return [
        Reply(text, "none", Usage({receiver.name: agent_usage(receiver, p, g)}), **stages.measured, finish_reason=reason)
        for text, p, g, reason in zip(out.texts, out.prompt_tokens, out.generated_tokens, out.finish_reasons,
                                      strict=True)
    ]


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """The receiver alone reads its prompt and answers."""
    receiver = team.receiver
    return [(receiver, prompt_length(receiver, receiver.prompt(query)), max_tokens)]


CHANNEL = register(Channel("none", run, context_use, needs_senders=False,
                           part=control_part("none", lambda team, queries, contexts: list(queries))))
