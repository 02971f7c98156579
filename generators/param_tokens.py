"""The TFlow generator: learned parameter tokens refined by attention over layers, kinds and the condition."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from generators.base import Factors, Generator
from generators.registry import register
from tflow.backbones.families import ReceiverSpec


class ParamTokenBlock(nn.Module):
    """Pre-LayerNorm residual block: attention along layers, within a layer, to the condition; MLP."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(4))
        self.across_layers, self.within_layer, self.to_cond = (
            nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True) for _ in range(3)
        )
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor, cond: Tensor, pad: Tensor) -> Tensor:
        """x: [N, L, K, d], cond: [N, T, d], pad: [N, T] (True = padding) -> [N, L, K, d]."""
        n, layers, kinds, _ = x.shape
        h = rearrange(self.norms[0](x), "n l k d -> (n k) l d")
        h = self.across_layers(h, h, h, need_weights=False)[0]
        x = x + rearrange(h, "(n k) l d -> n l k d", n=n)
        h = rearrange(self.norms[1](x), "n l k d -> (n l) k d")
        h = self.within_layer(h, h, h, need_weights=False)[0]
        x = x + rearrange(h, "(n l) k d -> n l k d", n=n)
        h = rearrange(self.norms[2](x), "n l k d -> n (l k) d")
        h = self.to_cond(h, cond, cond, key_padding_mask=pad, need_weights=False)[0]
        x = x + rearrange(h, "n (l k) d -> n l k d", l=layers, k=kinds)
        return x + self.mlp(self.norms[3](x))


@register("param_tokens")
class ParamTokenGenerator(Generator):
    """One learned token per (layer, module kind), refined by `depth` blocks, then detokenized.

    The condition is projected H -> d_model (Linear + LayerNorm) and read by cross-attention with
    padding masked out, so a row's factors do not depend on how far it is padded.
    """

    def __init__(self, spec: ReceiverSpec, config: Mapping[str, Any], sender_hidden_size: int):
        super().__init__(spec, config, sender_hidden_size)
        d, cfg = self.config["d_model"], self.config
        layers, kinds = len(self.detokenizer.layers), len(self.detokenizer.kinds)
        self.cond_proj = nn.Sequential(nn.Linear(sender_hidden_size, d), nn.LayerNorm(d))
        self.tokens = nn.Parameter(torch.randn(layers, kinds, d) * 0.02)
        self.layer_emb = nn.Parameter(torch.randn(layers, 1, d) * 0.02)
        self.kind_emb = nn.Parameter(torch.randn(1, kinds, d) * 0.02)
        self.blocks = nn.ModuleList(
            ParamTokenBlock(d, cfg["heads"], cfg["dropout"]) for _ in range(cfg["depth"])
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, cond: Tensor, mask: Tensor) -> Factors:
        """cond: [N, T, H], mask: [N, T] (True = real) -> {name: (A [N, r, in], B [N, out, r])}."""
        mask = mask.bool()
        # Zeroing padding first keeps even inf/nan garbage out of the (masked) attention values.
        cond = torch.where(mask[..., None], cond.to(self.tokens.dtype), 0.0)
        memory = self.cond_proj(cond)
        x = (self.tokens + self.layer_emb + self.kind_emb).expand(cond.shape[0], -1, -1, -1)
        for block in self.blocks:
            x = block(x, memory, ~mask)
        return self.detokenizer(self.norm(x))
