"""Fusion: one delta per sender, summed exactly by rank concatenation under a learned gate each."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from tflow.delta import LoRADelta


class Fusion(nn.Module):
    """Gate g_s = softplus(w_s) > 0 per sender; fused delta = sum_s g_s * delta_s (exact).

    `shares` gives each sender's gated delta; their sum (`LoRADelta.concat`) is one delta of rank
    S * r: A = cat_s(A_s), B = cat_s(g_s * B_s), so the receiver runs one matmul pair per module
    whatever the number of senders. Kept apart, the shares let an ablation drop one sender's.
    w_s starts at softplus^-1(gate_init), so every sender starts with weight `gate_init`.
    """

    def __init__(self, num_senders: int, gate_init: float = 1.0):
        super().__init__()
        start = math.log(math.expm1(gate_init))
        self.gate_logits = nn.Parameter(torch.full((num_senders,), start))

    def gates(self) -> Tensor:
        """Per-sender gates: [num_senders], all positive."""
        return softplus(self.gate_logits)

    def shares(self, factors: dict[str, tuple[Tensor, Tensor]], num_senders: int, scale: float) -> list[LoRADelta]:
        """factors: {module: (A [S * Q, r, in], B [S * Q, out, r])}, sender-major rows -> each sender's
        delta over Q rows, its gate folded into B: g_s * delta_s."""
        rows = next(iter(factors.values()))[0].shape[0] // num_senders
        gates = self.gates()
        return [
            LoRADelta({k: (a[s * rows : (s + 1) * rows], b[s * rows : (s + 1) * rows] * gates[s])
                       for k, (a, b) in factors.items()}, scale)
            for s in range(num_senders)
        ]
