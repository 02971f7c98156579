"""Fusion: one delta per sender, summed exactly by rank concatenation under a learned gate each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from tflow.lora.basis import BasisDelta
from tflow.lora.delta import LoRADelta

Delta = LoRADelta | BasisDelta


class Fusion(nn.Module):
    """Gate g_s = softplus(w_s) > 0 per sender; fused delta = sum_s g_s * delta_s (exact).

    `shares` gives each sender's gated delta; their sum (`fuse`) is one delta: for LoRA factors
    of rank S * r, A = cat_s(A_s), B = cat_s(g_s * B_s), so the receiver runs one matmul pair per
    module whatever the number of senders; on a shared basis the gated cores add, rank K. Kept apart, the shares let an ablation drop one sender's.
    w_s starts at softplus^-1(gate_init), so every sender starts with weight `gate_init`.
    """

    def __init__(self, num_senders: int, gate_init: float = 1.0):
        super().__init__()
        start = math.log(math.expm1(gate_init))
        self.gate_logits = nn.Parameter(torch.full((num_senders,), start))

    def gates(self) -> Tensor:
        """Per-sender gates: [num_senders], all positive."""
        return softplus(self.gate_logits)

    def shares(self, delta: Delta, num_senders: int) -> list[Delta]:
        """delta: S * Q rows, sender-major -> each sender's delta over Q rows, its gate folded in: g_s * delta_s."""
        rows = delta.batch_size // num_senders
        gates = self.gates()
        return [fuse([delta.select(slice(s * rows, (s + 1) * rows))], [gates[s]]) for s in range(num_senders)]


def fuse(deltas: Sequence[Delta], weights: Sequence[float | Tensor] | None = None) -> Delta:
    """The exact weighted sum of deltas of one kind: `LoRADelta.concat` or `BasisDelta.concat`."""
    return type(deltas[0]).concat(deltas, weights)
