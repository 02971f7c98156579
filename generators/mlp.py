"""A compact hypernetwork: pooled condition plus layer and kind embeddings through a shared MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from generators.base import Factors, Generator, masked_mean
from generators.registry import register
from tflow.backbones.families import ReceiverSpec


@register("mlp")
class MLPGenerator(Generator):
    """Masked-mean-pooled condition -> d_model, plus layer and kind embeddings, through a shared trunk.

    The trunk is `depth` x (Linear, GELU, Dropout) applied to every (layer, kind) slot; `heads` is
    accepted for config compatibility and unused.
    """

    def __init__(self, spec: ReceiverSpec, config: Mapping[str, Any], sender_hidden_size: int):
        super().__init__(spec, config, sender_hidden_size)
        d, cfg = self.config["d_model"], self.config
        layers, kinds = len(self.detokenizer.layers), len(self.detokenizer.kinds)
        self.cond_proj = nn.Sequential(nn.Linear(sender_hidden_size, d), nn.LayerNorm(d))
        self.layer_emb = nn.Parameter(torch.randn(layers, 1, d) * 0.02)
        self.kind_emb = nn.Parameter(torch.randn(1, kinds, d) * 0.02)
        self.trunk = nn.Sequential(
            *(m for _ in range(cfg["depth"]) for m in (nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg["dropout"])))
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, cond: Tensor, mask: Tensor) -> Factors:
        """cond: [N, T, H], mask: [N, T] (True = real) -> {name: (A [N, r, in], B [N, out, r])}."""
        pooled = self.cond_proj(masked_mean(cond.to(self.layer_emb.dtype), mask))
        x = pooled[:, None, None, :] + self.layer_emb + self.kind_emb
        return self.detokenizer(self.norm(self.trunk(x)))
