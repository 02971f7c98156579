"""How the `weights` channel (TFlow) runs a call: sender states -> generator -> fused delta patched into the receiver.

A query whose delta is not finite or exceeds the generator's `max_delta_norm` is answered
without it, and its Reply says so.
"""

from __future__ import annotations

import math

import torch

from tflow.agents.encoding import encode
from tflow.agents.generation import generate
from tflow.channels.ledger import Stages, agent_usage, generated_usage
from tflow.channels.registry import Call
from tflow.errors import ChannelError, QueryError
from tflow.lora.delta import LoRADelta
from tflow.lora.patching import patched
from tflow.reply import Reply, Usage


def check(call: Call) -> None:
    """Raises ChannelError: a receiver without a generator and no `delta` given; QueryError: a
    `delta` whose rows are neither one nor one per query."""
    if call.receiver.generator is None and call.message is None:
        raise ChannelError("the weights channel needs a generator on the receiver: "
                           "use tflow.load(recipe, checkpoint=DIR) or Receiver(..., generator=...)")
    if call.message is not None and call.message.batch_size not in (1, len(call.queries)):
        raise QueryError(f"the delta has {call.message.batch_size} rows for {len(call.queries)} queries; "
                         "give one row or one per query")


def run(call: Call) -> list[Reply]:
    senders, receiver, queries = call.senders, call.receiver, call.queries
    stages = Stages(senders, receiver)
    bound = receiver.generator.max_delta_norm if receiver.generator is not None else None
    states = None
    if call.message is None:
        with stages("senders"):
            states = encode(senders, queries, call.contexts)
        with stages("generator"), torch.no_grad():
            delta, refused = guard_delta(receiver.generator(states), bound)
    else:  # the guard judges a row shared by all queries once; patching repeats it per query
        delta, refused = guard_delta(call.message, bound)
        refused = refused * (len(queries) // call.message.batch_size)
    with stages("receiver"), patched(receiver.model, delta):
        out = generate(receiver.model, receiver.tokenizer, [receiver.prompt(q) for q in queries], call.settings,
                       **call.decode)
    per_row_bytes = delta.num_bytes // delta.batch_size
    replies = []
    for q, text in enumerate(out.texts):
        ledger = {} if states is None else {
            call.names[s]: agent_usage(sender, int(states.prompt_tokens[s * len(queries) + q]), 0,
                                       cached_tokens=int(states.cached_tokens[s * len(queries) + q]))
            for s, sender in enumerate(senders)}
        ledger[receiver.name] = generated_usage(receiver, out, q)
        replies.append(Reply(text, "weights", Usage(ledger), message_bytes=per_row_bytes, **stages.measured,
                             delta_applied=refused[q] is None, warnings=[refused[q]] if refused[q] else [],
                             finish_reason=out.finish_reasons[q]))
    return replies


def guard_delta(delta: LoRADelta, max_norm: float | None) -> tuple[LoRADelta, list[str | None]]:
    """`delta` with the rows that must not be applied zeroed, and per row why (None: applied).

    A row is refused when its norm (`LoRADelta.row_norms`) is NaN or inf, or above `max_norm`.
    """
    norms = delta.row_norms()
    reasons: list[str | None] = []
    for norm in norms.tolist():
        if not math.isfinite(norm):
            reasons.append("the generated delta is not finite (NaN or inf); answered without it")
        elif max_norm is not None and norm > max_norm:
            reasons.append(f"the generated delta's norm {norm:.4g} exceeds generator.max_delta_norm "
                           f"{max_norm:g}; answered without it")
        else:
            reasons.append(None)
    refused = [r is not None for r in reasons]
    if any(refused):
        delta = delta.zero_rows(torch.tensor(refused, device=norms.device))
    return delta, reasons
