"""Conditioning: sender hidden states of every layer -> one masked feature sequence per row."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerAggregation(nn.Module):
    """cond = sum_l softmax(w / tau)_l * rmsnorm(h_l), tau = exp(log_tau) learned; padding zeroed.

    Each layer is RMS-normalised first, so layers with huge activations do not drown the rest.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def weights(self) -> Tensor:
        """Mixing weights over layers: [num_layers], summing to 1."""
        return torch.softmax(self.layer_logits / self.log_temperature.exp(), dim=0)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden: [layers, N, T, H], mask: [N, T] bool -> cond: [N, T, H], zero where mask is False."""
        hidden = hidden.to(self.layer_logits.dtype)
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        cond = torch.einsum("l,lnth->nth", self.weights(), normed)
        return cond.masked_fill(~mask[..., None], 0.0)
