"""One trainable LoRA on the receiver, in peft's layout and initialisation: the kv channel's part,
and the trained controls' (none, text, context).

A: [rank, in] Kaiming-uniform, B: [out, rank] zero, scale alpha / rank, as peft's LoraLayer: a
fresh adapter is an exact no-op, so an untrained kv channel is LatentMAS and an untrained control
is the plain receiver. It is applied through
tflow's per-row hooks (`tflow.lora.patching`), which leave the shared backbone untouched for the other
channels and the senders, and saved as a peft adapter folder (peft's output equals the hooks').
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tflow.backbones.families import ReceiverSpec
from tflow.lora.delta import LoRADelta


class ReceiverLoRA(nn.Module):
    """One LoRA over `spec`'s modules. a[i]: [rank, in_i], b[i]: [out_i, rank]."""

    def __init__(self, spec: ReceiverSpec, rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.spec, self.rank, self.alpha = spec, rank, float(alpha)
        g = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterList([nn.Parameter(torch.empty(rank, m.in_features)) for m in spec.modules])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(m.out_features, rank)) for m in spec.modules])
        for a in self.a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)

    @property
    def config(self) -> dict:
        """What a checkpoint of it must match, beside the receiver's fingerprint."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.spec.targets),
                "layers": list(self.spec.layers)}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def is_zero(self) -> bool:
        """Whether every B is zero: the adapter changes nothing (a fresh one, LatentMAS)."""
        return all(not b.any() for b in self.b)

    def delta(self) -> LoRADelta:
        """The adapter as a one-row LoRADelta (patching repeats it for every query of a batch)."""
        return LoRADelta({m.name: (a[None], b[None]) for m, a, b in zip(self.spec.modules, self.a, self.b, strict=True)},
                         scale=self.scale)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under peft's keys: `base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight`."""
        from tflow.lora.peft_format import KEY_PREFIX

        out = {}
        for m, a, b in zip(self.spec.modules, self.a, self.b, strict=True):
            out[f"{KEY_PREFIX}{m.name}.lora_A.weight"] = a.detach().cpu().contiguous()
            out[f"{KEY_PREFIX}{m.name}.lora_B.weight"] = b.detach().cpu().contiguous()
        return out

    def load_peft_state(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy tensors saved by `peft_state` in; returns the keys it expected and did not find."""
        state, missing = self.peft_state(), []
        with torch.no_grad():
            for i, key in enumerate(state):
                target = (self.a if key.endswith("lora_A.weight") else self.b)[i // 2]
                if key in tensors and tensors[key].shape == target.shape:
                    target.copy_(tensors[key])
                else:
                    missing.append(key)
        return missing
