"""Sender encoding: every sender and every query in one forward per backbone, decoder stack only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from tflow.agents.agent import Sender
from tflow.agents.prefix import Prefix, prefix_text, prefixes, reusable, reused_lengths
from tflow.errors import ModelLoadError


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device=None) -> tuple[Tensor, Tensor]:
    """Pad token lists to one length on `device`; returns ids [N, T] and a bool mask [N, T] (True = token)."""
    width = max(len(s) for s in seqs)
    pads = [[pad_id] * (width - len(s)) for s in seqs]
    rows = [p + list(s) if side == "left" else list(s) + p for s, p in zip(seqs, pads, strict=True)]
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # one copy to the device, not one per row
    lengths = torch.tensor([len(s) for s in seqs], device=device)[:, None]
    columns = torch.arange(width, device=device)
    return ids, columns >= width - lengths if side == "left" else columns < lengths


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of chat-template texts (the template already carries any special tokens)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def prompt_length(agent, text: str) -> int:
    """How many tokens `agent` reads for `text` (its own tokenizer, no special tokens added)."""
    return len(token_ids(agent.tokenizer, [text])[0])


def backbone_groups(senders: Sequence[Sender]) -> list[int]:
    """Each sender's backbone group: senders on one model object share a group, numbered in order
    of first appearance (the order `encode` runs them and a Hypernetwork keys its conditioning by)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(s.model), len(first)) for s in senders]


@dataclass(frozen=True)
class SenderStates:
    """Hidden states of every (sender, query) pair, one block per sender backbone group.

    hiddens[g]: [layers_g + 1, S_g * Q, T_g, H_g] (embeddings, then each decoder layer) of the S_g
    senders of group g, member-major (the group's j-th sender's query q is row j * Q + q), padded
    positions zero; masks[g]: [S_g * Q, T_g] bool, True on real tokens; groups[s]: sender s's group
    (`backbone_groups`); prompt_tokens: [S * Q] real tokens per row, sender-major (row s * Q + q);
    ids[g]: [S_g * Q, T_g] the token ids behind hiddens[g] (the pad id where masks[g] is False);
    cached_tokens: [S * Q] sender-major, each row's prompt tokens read from a kept role prefix
    instead of run (zeros without reuse).
    """

    hiddens: tuple[Tensor, ...]
    masks: tuple[Tensor, ...]
    groups: tuple[int, ...]
    prompt_tokens: Tensor
    num_senders: int
    num_queries: int
    ids: tuple[Tensor, ...] = ()
    cached_tokens: Tensor | None = None

    @property
    def hidden(self) -> Tensor:
        """The one backbone's hidden states, [layers + 1, S * Q, T, H], sender-major.

        Raises:
            ModelLoadError: the senders run on several backbones (read `hiddens` per group).
        """
        return self.hiddens[self._single()]

    @property
    def mask(self) -> Tensor:
        """The one backbone's mask, [S * Q, T] bool (see `hidden`)."""
        return self.masks[self._single()]

    def rows(self, sender: int) -> tuple[int, slice]:
        """(group, rows of that group's block) holding sender `sender`'s queries."""
        return sender_rows(self.groups, sender, self.num_queries)

    def _single(self) -> int:
        if len(self.hiddens) != 1:
            raise ModelLoadError(f"the senders run on {len(self.hiddens)} backbones, so their states have no single "
                                 "hidden tensor; read hiddens[g] and masks[g] per backbone group")
        return 0


def encode(senders: Sequence[Sender], queries: Sequence[str],
           contexts: Sequence[Sequence[str | None]] | None = None, *, reuse_prefixes: bool = True) -> SenderStates:
    """Run all senders on all queries: one no-grad forward per distinct backbone, no LM head.

    contexts[s][q], when given and not None, is sender s's private document for query q.

    Senders that share a model object share its forward and its block of the states; backbones may
    differ in layer count, width, tokenizer and chat template. Right padding keeps every real
    position's computation independent of padding and of batchmates. With `reuse_prefixes`,
    each sender's role prompt (and own context) is prefilled once per backbone and kept
    (tflow.agents.prefix); only the rest of each prompt runs, unless the backbone is training or patched.
    """
    groups = backbone_groups(senders)
    hiddens, masks, ids, cached = [], [], [], []
    for g in range(max(groups) + 1):
        members = [i for i, group in enumerate(groups) if group == g]
        model, tokenizer = senders[members[0]].model, senders[members[0]].tokenizer
        texts = [senders[i].prompt(q, contexts[i][j] if contexts else None)
                 for i in members for j, q in enumerate(queries)]
        seqs = token_ids(tokenizer, texts)
        if reuse_prefixes and reusable(model):
            kept = prefixes(model, [tuple(p) for p in token_ids(tokenizer, [prefix_text(senders[i]) for i in members])])
            hidden, mask, padded, keep = _forward_after(model, seqs, [p for p in kept for _ in queries],
                                                        tokenizer.pad_token_id)
        else:
            hidden, mask, padded = _forward(model, seqs, tokenizer.pad_token_id)
            keep = [0] * len(seqs)
        hiddens.append(hidden)
        masks.append(mask)
        ids.append(padded)
        cached.append(torch.tensor(keep, device="cpu"))  # cpu: a count for the ledger, beside `tokens`
    tokens = [m.sum(-1).cpu() for m in masks]
    return SenderStates(tuple(hiddens), tuple(masks), tuple(groups), _sender_major(tokens, groups, len(queries)),
                        len(senders), len(queries), tuple(ids), _sender_major(cached, groups, len(queries)))


def _sender_major(blocks: Sequence[Tensor], groups: Sequence[int], num_queries: int) -> Tensor:
    """Per-row values [S * Q], sender-major, gathered from each backbone group's block of rows."""
    if len(blocks) == 1:
        return blocks[0]
    return torch.cat([blocks[g][rows] for g, rows in (sender_rows(groups, s, num_queries) for s in range(len(groups)))])


def sender_rows(groups: Sequence[int], sender: int, num_queries: int) -> tuple[int, slice]:
    """(group, rows of that group's block of `SenderStates`) holding sender `sender`'s queries."""
    group = groups[sender]
    j = list(groups[:sender]).count(group)
    return group, slice(j * num_queries, (j + 1) * num_queries)


def _forward(model: nn.Module, seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every layer's states of right-padded `seqs`: hidden [layers + 1, N, T, H] (padding zero), mask [N, T]
    and the padded ids [N, T]."""
    ids, mask = pad_batch(seqs, pad_id, "right", next(model.parameters()).device)
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states).masked_fill(~mask[None, :, :, None], 0.0), mask, ids


def _forward_after(model: nn.Module, seqs: list[list[int]], prefixes: list[Prefix], pad_id: int
                   ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """As `_forward`, but each row reuses the states of its leading tokens shared with its prefix;
    also returns how many leading tokens of each row were read (`keep`).

    The rows' kept prefixes (lengths differ) are left-padded into one past cache, the rest of every
    row runs right-padded on top of it at its true positions, and the two parts are joined back.
    """
    keep = reused_lengths(seqs, prefixes)
    past = max(keep)
    if past == 0:
        return (*_forward(model, seqs, pad_id), keep)
    device = next(model.parameters()).device
    ids, rest = pad_batch([seq[k:] for seq, k in zip(seqs, keep, strict=True)], pad_id, "right", device)
    n, width = ids.shape
    first = prefixes[0]
    keys = first.keys.new_zeros(first.keys.shape[0], n, first.keys.shape[1], past, first.keys.shape[3])
    values = torch.zeros_like(keys)
    hidden = first.hidden.new_zeros(first.hidden.shape[0], n, past + width, first.hidden.shape[-1])
    seen = torch.zeros(n, past, dtype=torch.bool, device=device)
    spans: dict[tuple[int, int], list[int]] = {}
    for r, (p, k) in enumerate(zip(prefixes, keep, strict=True)):
        spans.setdefault((id(p), k), []).append(r)
    by_id = {id(p): p for p in prefixes}
    for (key, k), members in spans.items():
        p, at = by_id[key], torch.tensor(members, device=device)
        keys[:, at, :, past - k:] = p.keys[:, None, :, :k]
        values[:, at, :, past - k:] = p.values[:, None, :, :k]
        hidden[:, at, :k] = p.hidden[:, None, :k]
        seen[at, past - k:] = True
    cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)), config=model.config)
    positions = torch.tensor(keep, device=device)[:, None] + torch.arange(width, device=device)
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=torch.cat([seen, rest], 1).long(), position_ids=positions,
                               past_key_values=cache, use_cache=True, output_hidden_states=True)
    tail = torch.stack(out.hidden_states)
    for (_, k), members in spans.items():
        at = torch.tensor(members, device=device)
        hidden[:, at, k:k + width] = tail[:, at]
    full, mask = pad_batch(seqs, pad_id, "right", device)
    return hidden[:, :, :mask.shape[1]].masked_fill(~mask[None, :, :, None], 0.0), mask, full, keep
