"""A batch's growing KV cache with a running 2-D mask: segments of different lengths, appended exactly.

Every appended segment is left-padded, the mask keeps which cache positions are real, and each
forward gets explicit position ids (`mask.cumsum(-1) - 1`), so a row's numbers are the ones it
gets alone: padding in the middle of the cache is masked and moves no position. Without the
explicit positions, pads in the middle of the cache move logits by 0.05-0.1 (transformers 5.23).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from tflow.agents.encoding import pad_batch
from tflow.agents.prefix import prefixes, reusable, reused_lengths


class Trace:
    """The cache and mask of `rows` sequences on one model.

    cache: a transformers DynamicCache, keys/values [rows, kv_heads, T, head_dim] per layer;
    mask: [rows, T] long, 1 on real positions. A forward appends to the cache in place.
    """

    def __init__(self, model: nn.Module, rows: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def lengths(self) -> list[int]:
        """Real positions per row."""
        return self.mask.sum(-1).tolist()

    def rows_kv(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Each row's real positions, detached on the CPU: per row, per layer (keys, values)
        [kv_heads, positions, head_dim] (a message another call can replay, `from_rows`)."""
        layers = [(layer.keys.detach().cpu(), layer.values.detach().cpu()) for layer in self.cache.layers]
        real = self.mask.bool().cpu()
        return [[(k[r][:, real[r]], v[r][:, real[r]]) for k, v in layers] for r in range(self.rows)]

    @classmethod
    def from_rows(cls, model: nn.Module, rows: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> Trace:
        """A trace holding `rows` (as `rows_kv` gives them), each left-padded to the longest."""
        trace = cls(model, len(rows))
        width = max(row[0][0].shape[1] for row in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device="cpu")  # cpu: filled beside the host rows, moved with them
        layers = []
        for layer in range(len(rows[0])):
            keys = rows[0][layer][0].new_zeros(len(rows), rows[0][layer][0].shape[0], width, rows[0][layer][0].shape[2])
            values = torch.zeros_like(keys)
            for r, row in enumerate(rows):
                k, v = row[layer]
                keys[r, :, width - k.shape[1]:], values[r, :, width - k.shape[1]:] = k, v
                mask[r, width - k.shape[1]:] = 1
            layers.append((keys.to(trace.device), values.to(trace.device)))
        trace.cache = DynamicCache(ddp_cache_data=layers, config=model.config)
        trace.mask = mask.to(trace.device)
        return trace

    @classmethod
    def after_prefixes(cls, model: nn.Module, seqs: Sequence[Sequence[int]],
                       prefix_ids: Sequence[tuple[int, ...]]) -> tuple[Trace, list[int]]:
        """A trace holding, for each row of `seqs`, the leading tokens it shares with its prefix
        `prefix_ids[r]`, read from the states kept per model (tflow.agents.prefix), and how many tokens
        that is per row: the rest of each row is still to be appended. Holds nothing (all zeros)
        where the model reads no kept states (`reusable`: training or patched)."""
        if not reusable(model):
            return cls(model, len(seqs)), [0] * len(seqs)
        kept = prefixes(model, list(prefix_ids))
        keep = reused_lengths(seqs, kept)
        if max(keep) == 0:
            return cls(model, len(seqs)), keep
        layers = range(kept[0].keys.shape[0])
        return cls.from_rows(model, [[(p.keys[layer][:, :k], p.values[layer][:, :k]) for layer in layers]
                                     for p, k in zip(kept, keep, strict=True)]), keep

    def append_ids(self, seqs: Sequence[Sequence[int]], pad_id: int, *, full: bool = False):
        """Append one token segment per row (left-padded); returns the forward's output.

        Runs the decoder stack only (`last_hidden_state` [rows, W, H], after the final norm)
        unless `full`, which runs the LM head too (`logits` [rows, W, V]).
        """
        ids, mask = pad_batch(seqs, pad_id, "left", self.device)
        return self._forward(mask.long(), full, input_ids=ids)

    def append_embeds(self, embeds: Tensor, mask: Tensor | None = None, *, full: bool = False):
        """Append input embeddings [rows, W, H] (left-padded, `mask` [rows, W], None: all real)."""
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return self._forward(mask.long(), full, inputs_embeds=embeds)

    def _forward(self, segment: Tensor, full: bool, **inputs):
        mask = torch.cat([self.mask, segment], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -segment.shape[1]:]
        net = self.model if full else self.model.base_model
        out = net(attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True, **inputs)
        self.mask = mask
        return out


def last_real(hidden: Tensor) -> Tensor:
    """The state of each row's last position [rows, H] from [rows, W, H]: with left padding, the last
    column is every row's last real position."""
    return hidden[:, -1]
