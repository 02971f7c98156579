"""Ablations of the kv channel's message, its senders' shared KV trace, as deltas are ablated.

Every query's trace is collected once (`kv_messages`), edited per ablation row (`ablate_kv`) and
replayed through `tflow.communicate(..., message=...)`: `shuffled` (another query's trace),
`static` (the position-wise mean of the traces aligned at their last position, over the queries
that reach that position) and `drop-sender:NAME` (the trace rebuilt without that sender's turn;
the others then never attended to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from tflow.agents.agent import Receiver, Sender
from tflow.channels.dispatch import batched_calls, sender_names
from tflow.channels.kv.run import build_trace
from tflow.channels.registry import Call
from tflow.evaluation.ablations import derangement

KVRow = list[tuple[Tensor, Tensor]]
"""One query's trace: per layer (keys, values) [kv_heads, positions, head_dim], real positions only."""


@dataclass(frozen=True)
class KVMessages:
    """Every query's trace, and with drop-sender the traces built without each sender."""

    senders: tuple[str, ...]
    rows: list[KVRow]
    dropped: dict[str, list[KVRow]] = field(default_factory=dict)



def kv_messages(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
                contexts: Sequence[Mapping[str, str]] | None = None, batch_size: int = 8,
                ablations: Sequence[str] = (), **settings) -> KVMessages:
    """Build every query's kv trace (no receiver run), and without each sender if `drop-sender`.

    `settings` are the channel's `latent_steps` and `realign`. Held on the CPU: a trace per
    query, times (1 + senders) with drop-sender.
    """
    names = tuple(sender_names(senders, receiver))
    rows: list[KVRow] = []
    dropped: dict[str, list[KVRow]] = {}
    for call in batched_calls(senders, receiver, queries, contexts, batch_size, settings):
        with torch.no_grad():
            rows += build_trace(call)[0].rows_kv()
            if "drop-sender" in ablations and len(senders) > 1:
                for s, name in enumerate(names):
                    dropped.setdefault(name, []).extend(build_trace(_without(call, s))[0].rows_kv())
    return KVMessages(names, rows, dropped)


def _without(call: Call, s: int) -> Call:
    """`call` with sender s left out (the others keep their names and documents)."""
    def drop(items):
        return None if items is None else [x for i, x in enumerate(items) if i != s]

    return replace(call, senders=drop(call.senders), names=drop(call.names), contexts=drop(call.contexts))



def ablate_kv(messages: KVMessages, names: Sequence[str], *, seed: int = 0) -> dict[str, list[KVRow]]:
    """The trace each ablation row answers with, one per query."""
    rows, n = {}, len(messages.rows)
    for name in names:
        if name == "shuffled":
            rows[name] = [messages.rows[j] for j in derangement(n, seed)]
        elif name == "static":
            rows[name] = [mean_trace(messages.rows)] * n
        elif name == "drop-sender":
            rows.update({f"drop-sender:{s}": trace for s, trace in messages.dropped.items()})
    return rows



def mean_trace(rows: Sequence[KVRow]) -> KVRow:
    """The position-wise mean of traces aligned at their last position: position -j is the mean
    over the traces with at least j positions."""
    width = max(row[0][0].shape[1] for row in rows)
    mean = []
    for layer in range(len(rows[0])):
        k0 = rows[0][layer][0]
        keys = k0.new_zeros(k0.shape[0], width, k0.shape[2])
        values = torch.zeros_like(keys)
        count = k0.new_zeros(width)
        for row in rows:
            k, v = row[layer]
            keys[:, width - k.shape[1]:] += k
            values[:, width - k.shape[1]:] += v
            count[width - k.shape[1]:] += 1
        mean.append((keys / count[:, None], values / count[:, None]))
    return mean


