"""Ablations of the latent channels' messages: kv traces and latent thoughts, as deltas are ablated.

The kv channel's message is the senders' shared KV trace, the latent channel's the thoughts
spliced into the receiver's prompt. Both are collected once per query (`kv_messages`,
`latent_messages`), edited per ablation row (`ablate_kv`, `ablate_latent`), and replayed through
`tflow.communicate(..., message=...)`:

- `shuffled`: query i gets query order[i]'s message (`tflow.diagnostics.derangement`);
- `static`: every query gets one mean message (latent: the mean thoughts; kv: the position-wise
  mean of the traces aligned at their last position, over the queries that reach that position);
- `drop-sender:NAME`: kv rebuilds the trace without that sender's turn (the others then never
  attended to it); latent removes its block of thoughts (exact with one round; with more, the
  first sender's thoughts have read the receiver's feedback on all senders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from tflow.agents import Receiver, Sender
from tflow.channels import sender_names
from tflow.channels.dispatch import by_sender
from tflow.channels.kv import build_trace
from tflow.channels.latent import converse, tallies
from tflow.channels.ledger import Stages
from tflow.channels.registry import Call
from tflow.generation import GenerationSettings

KVRow = list[tuple[Tensor, Tensor]]
"""One query's trace: per layer (keys, values) [kv_heads, positions, head_dim], real positions only."""

LATENT_ABLATIONS = ("shuffled", "static", "drop-sender")


@dataclass(frozen=True)
class KVMessages:
    """Every query's trace, and with drop-sender the traces built without each sender."""

    senders: tuple[str, ...]
    rows: list[KVRow]
    dropped: dict[str, list[KVRow]] = field(default_factory=dict)


@dataclass(frozen=True)
class LatentMessages:
    """Every query's spliced thoughts [queries, senders x steps, hidden], sender s's at s x steps."""

    senders: tuple[str, ...]
    thoughts: Tensor
    steps: int


def _calls(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
           contexts: Sequence[Mapping[str, str]] | None, batch_size: int, settings: Mapping):
    """The channel's Call for each batch of queries, as `communicate` makes it."""
    names = sender_names(senders, receiver)
    for start in range(0, len(queries), batch_size):
        batch = list(queries[start:start + batch_size])
        per_sender = by_sender(contexts[start:start + batch_size] if contexts is not None else None, names)
        yield Call(senders, receiver, batch, GenerationSettings(), names, per_sender, **settings)


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
    for call in _calls(senders, receiver, queries, contexts, batch_size, settings):
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


def latent_messages(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
                    contexts: Sequence[Mapping[str, str]] | None = None, batch_size: int = 8,
                    ablations: Sequence[str] = (), **settings) -> LatentMessages:
    """Every query's thoughts as the latent channel splices them (no final receiver run).

    `settings` are the channel's `latent_steps` and `rounds`.
    """
    names = sender_names(senders, receiver)
    parts = []
    for call in _calls(senders, receiver, queries, contexts, batch_size, settings):
        seen = tallies([*names, receiver.name], len(call.queries))
        with torch.no_grad():
            parts.append(converse(call, Stages(senders, receiver), seen)[0].cpu())
    thoughts = torch.cat(parts)
    return LatentMessages(tuple(names), thoughts, thoughts.shape[1] // len(senders))


def ablate_kv(messages: KVMessages, names: Sequence[str], *, seed: int = 0) -> dict[str, list[KVRow]]:
    """The trace each ablation row answers with, one per query."""
    from tflow.diagnostics import derangement

    rows, n = {}, len(messages.rows)
    for name in names:
        if name == "shuffled":
            rows[name] = [messages.rows[j] for j in derangement(n, seed)]
        elif name == "static":
            rows[name] = [mean_trace(messages.rows)] * n
        elif name == "drop-sender":
            rows.update({f"drop-sender:{s}": trace for s, trace in messages.dropped.items()})
    return rows


def ablate_latent(messages: LatentMessages, names: Sequence[str], *, seed: int = 0) -> dict[str, Tensor]:
    """The thoughts each ablation row answers with, [queries, vectors, hidden]."""
    from tflow.diagnostics import derangement

    thoughts, steps, rows = messages.thoughts, messages.steps, {}
    for name in names:
        if name == "shuffled":
            rows[name] = thoughts[torch.tensor(derangement(len(thoughts), seed))]
        elif name == "static":
            rows[name] = thoughts.mean(0, keepdim=True).expand_as(thoughts)
        elif name == "drop-sender":
            for s, sender in enumerate(messages.senders):
                rows[f"drop-sender:{sender}"] = torch.cat([thoughts[:, :s * steps], thoughts[:, (s + 1) * steps:]], 1)
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


def part(messages, rows: slice):
    """The messages of the queries in `rows`."""
    return messages[rows]
