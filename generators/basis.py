"""The basis generator: the param-token trunk emits a K x K core per module over a shared learned basis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from generators.base import SlotHead
from generators.param_tokens import ParamTokenGenerator
from generators.registry import register
from tflow.backbones.families import ReceiverSpec
from tflow.lora.basis import BasisDelta


class CoreHead(SlotHead):
    """Per-kind heads turning each slot's token into a core M [N, K, K], plus every module's basis.

    Each targeted module owns U [K, in] and V [out, K], learned with the generator. Core heads start
    at exactly zero, so a fresh generator is a no-op; U starts like a LoRA A (std 1/sqrt(in)) and V
    with std 1/sqrt(K), nonzero, or the cores would get no gradient. The core is the head's output
    times `head_scale`, for the reason `Detokenizer` scales B.
    """

    def __init__(self, spec: ReceiverSpec, d_model: int, k: int, head_scale: float):
        super().__init__(spec)
        self.k, self.head_scale = k, head_scale
        self.core = nn.ModuleDict({kind: nn.Linear(d_model, k * k) for kind in self.kinds})
        for head in self.core.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        shapes = {m.name: (m.in_features, m.out_features) for m in spec.modules}
        self.u = nn.ParameterList(nn.Parameter(torch.randn(k, shapes[n][0]) / math.sqrt(shapes[n][0]))
                                  for n in self.names)
        self.v = nn.ParameterList(nn.Parameter(torch.randn(shapes[n][1], k) / math.sqrt(k)) for n in self.names)

    def basis(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{module name: (U [K, in], V [out, K])}."""
        return {name: (u, v) for name, u, v in zip(self.names, self.u, self.v, strict=True)}

    def emit(self, kind: str, tokens: Tensor) -> Sequence[Tensor]:
        """tokens: [N, l, d_model] -> l cores [N, K, K]."""
        cores = rearrange(self.core[kind](tokens) * self.head_scale, "n l (i j) -> l n i j", i=self.k)
        return list(cores.unbind(0))


@register("basis")
class BasisGenerator(ParamTokenGenerator):
    """Param-token trunk, core head: a query's delta is `scale * V M_b U` with U, V shared by all queries.

    `rank` is the basis size K (default 16). A message is K² numbers a module, against r·(in + out)
    for per-row LoRA factors, and the hook reads U and V once for the whole batch.
    """

    default_rank = 16
    copy_head = False  # its deltas live on a shared basis: no per-token rank beside them

    def head(self, spec: ReceiverSpec) -> CoreHead:
        return CoreHead(spec, self.config["d_model"], self.rank, self.config["head_scale"])

    def delta(self, cond: Tensor, mask: Tensor) -> BasisDelta:
        """The cores for every condition row on this generator's basis, with its scale."""
        return BasisDelta(self.detokenizer.basis(), self(cond, mask), self.scale)
