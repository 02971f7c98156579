"""Sender encoding: every sender and every query in one forward per backbone, decoder stack only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tflow.agents import Sender
from tflow.errors import ModelLoadError


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device=None) -> tuple[Tensor, Tensor]:
    """Pad token lists to one length; returns ids [N, T] and a bool mask [N, T] (True = token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = True
    return ids.to(device), mask.to(device)


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of chat-template texts (the template already carries any special tokens)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class SenderStates:
    """Hidden states of every (sender, query) pair, sender-major: row s * Q + q.

    hidden: [layers + 1, S * Q, T, H] (embeddings, then each decoder layer), padded positions zero;
    mask: [S * Q, T] bool, True on real tokens; prompt_tokens: [S * Q] real tokens per row.
    """

    hidden: Tensor
    mask: Tensor
    prompt_tokens: Tensor
    num_senders: int
    num_queries: int


def encode(senders: Sequence[Sender], queries: Sequence[str],
           contexts: Sequence[Sequence[str | None]] | None = None) -> SenderStates:
    """Run all senders on all queries: one no-grad forward per distinct backbone, no LM head.

    contexts[s][q], when given and not None, is sender s's private document for query q.

    Senders that share a model object share its forward. Right padding keeps every real
    position's computation independent of padding and of batchmates.

    Raises:
        ModelLoadError: sender backbones disagree on hidden size or layer count.
    """
    groups: dict[int, list[int]] = {}
    for i, sender in enumerate(senders):
        groups.setdefault(id(sender.model), []).append(i)
    rows: dict[int, tuple[Tensor, Tensor]] = {}
    for members in groups.values():
        model, tokenizer = senders[members[0]].model, senders[members[0]].tokenizer
        texts = [senders[i].prompt(q, contexts[i][j] if contexts else None)
                 for i in members for j, q in enumerate(queries)]
        seqs = token_ids(tokenizer, texts)
        device = next(model.parameters()).device
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "right", device)
        with torch.no_grad():
            out = model.base_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
        hidden = torch.stack(out.hidden_states).masked_fill(~mask[None, :, :, None], 0.0)
        for j, i in enumerate(members):
            block = slice(j * len(queries), (j + 1) * len(queries))
            rows[i] = (hidden[:, block], mask[block])
    shapes = {(h.shape[0], h.shape[-1]) for h, _ in rows.values()}
    if len(shapes) != 1:
        raise ModelLoadError(f"sender backbones must share layer count and hidden size, got {sorted(shapes)}")
    width = max(m.shape[1] for _, m in rows.values())
    hidden = torch.cat([_pad_right(rows[i][0], width, 2) for i in range(len(senders))], dim=1)
    mask = torch.cat([_pad_right(rows[i][1], width, 1) for i in range(len(senders))], dim=0)
    return SenderStates(hidden, mask, mask.sum(-1), len(senders), len(queries))


def _pad_right(t: Tensor, width: int, dim: int) -> Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
