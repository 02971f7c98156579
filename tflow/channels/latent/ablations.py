"""Ablations of the latent channel's message, the thoughts spliced into the receiver's prompt.

Every query's thoughts are collected once (`latent_messages`), edited per ablation row
(`ablate_latent`) and replayed through `tflow.communicate(..., message=...)`: `shuffled` (another
query's thoughts), `static` (the mean thoughts) and `drop-sender:NAME` (that sender's block of
thoughts removed; exact with one round; with more, the first sender's thoughts have read the
receiver's feedback on all senders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tflow.agents.agent import Receiver, Sender
from tflow.channels.dispatch import batched_calls, sender_names
from tflow.channels.latent.run import converse, tallies
from tflow.channels.ledger import Stages
from tflow.evaluation.ablations import derangement


@dataclass(frozen=True)
class LatentMessages:
    """Every query's spliced thoughts [queries, senders x steps, hidden], sender s's at s x steps."""

    senders: tuple[str, ...]
    thoughts: Tensor
    steps: int



def latent_messages(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
                    contexts: Sequence[Mapping[str, str]] | None = None, batch_size: int = 8,
                    ablations: Sequence[str] = (), **settings) -> LatentMessages:
    """Every query's thoughts as the latent channel splices them (no final receiver run).

    `settings` are the channel's `latent_steps` and `rounds`.
    """
    names = sender_names(senders, receiver)
    parts = []
    for call in batched_calls(senders, receiver, queries, contexts, batch_size, settings):
        seen = tallies([*names, receiver.name], len(call.queries))
        with torch.no_grad():
            parts.append(converse(call, Stages(senders, receiver), seen)[0].cpu())
    thoughts = torch.cat(parts)
    return LatentMessages(tuple(names), thoughts, thoughts.shape[1] // len(senders))



def ablate_latent(messages: LatentMessages, names: Sequence[str], *, seed: int = 0) -> dict[str, Tensor]:
    """The thoughts each ablation row answers with, [queries, vectors, hidden]."""
    thoughts, steps, rows = messages.thoughts, messages.steps, {}
    for name in names:
        if name == "shuffled":
            rows[name] = thoughts[torch.tensor(derangement(len(thoughts), seed), device=thoughts.device)]
        elif name == "static":
            rows[name] = thoughts.mean(0, keepdim=True).expand_as(thoughts)
        elif name == "drop-sender":
            for s, sender in enumerate(messages.senders):
                rows[f"drop-sender:{sender}"] = torch.cat([thoughts[:, :s * steps], thoughts[:, (s + 1) * steps:]], 1)
    return rows


