"""BasisDelta: per-row cores on a shared learned basis, ΔW_b = scale · V M_b U for each module."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tflow.errors import CheckpointError, DeltaError
from tflow.io import atomic_write_safetensors, read_safetensors
from tflow.lora.delta import FrobeniusNorms, LoRADelta, concat_weights, linear_module


@dataclass(frozen=True)
class BasisDelta(FrobeniusNorms):
    """Low-rank update `scale * V M_b U` for each named module and each batch row b.

    basis: {module_name: (U, V)} with U: [K, in_features] and V: [out_features, K], shared by all
    rows; cores: {module_name: M} with M: [batch, K, K]. A row's message is its cores alone
    (K² numbers a module); the basis lives in the generator's checkpoint. Because every row and
    every sender share U and V, a weighted sum of deltas is the weighted sum of their cores.

    Raises:
        DeltaError: no modules, basis and cores naming different modules, or shapes that disagree.
    """

    basis: Mapping[str, tuple[Tensor, Tensor]]
    cores: Mapping[str, Tensor]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.cores:
            raise DeltaError("BasisDelta needs at least one module in `cores`")
        if self.basis.keys() != self.cores.keys():
            missing = sorted(set(self.basis) ^ set(self.cores))[:3]
            raise DeltaError(f"basis and cores must name the same modules; only one of them has {missing}")
        batches = set()
        for name, core in self.cores.items():
            u, v = self.basis[name]
            if u.dim() != 2 or v.dim() != 2 or core.dim() != 3:
                raise DeltaError(f"{name}: need U [K, in], V [out, K] and a core [batch, K, K]; got U "
                                 f"{tuple(u.shape)}, V {tuple(v.shape)} and core {tuple(core.shape)}")
            k = u.shape[0]
            if v.shape[1] != k or core.shape[1:] != (k, k):
                raise DeltaError(f"{name}: the core {tuple(core.shape)} disagrees with the basis (U "
                                 f"{tuple(u.shape)}, V {tuple(v.shape)}); a core must be [batch, {k}, {k}]")
            batches.add(core.shape[0])
        if len(batches) != 1:
            raise DeltaError(f"all modules need the same batch size, got {sorted(batches)}")
        object.__setattr__(self, "basis", dict(self.basis))
        object.__setattr__(self, "cores", dict(self.cores))

    @property
    def batch_size(self) -> int:
        return next(iter(self.cores.values())).shape[0]

    @property
    def modules(self) -> tuple[str, ...]:
        """The names of the modules this delta patches."""
        return tuple(self.cores)

    @property
    def num_bytes(self) -> int:
        """Bytes of the cores: what a weight-space message weighs (the shared basis is not sent)."""
        return sum(m.numel() * m.element_size() for m in self.cores.values())

    def validate(self, model: nn.Module) -> None:
        """Check every module exists in `model`, is an nn.Linear, and fits the basis shapes.

        Raises:
            DeltaError: naming the module and both shapes.
        """
        modules = dict(model.named_modules())
        for name, (u, v) in self.basis.items():
            module = linear_module(modules, name)
            if u.shape[1] != module.in_features or v.shape[0] != module.out_features:
                raise DeltaError(f"{name}: basis U {tuple(u.shape)} / V {tuple(v.shape)} do not fit "
                                 f"Linear(in={module.in_features}, out={module.out_features})")

    def _squared_norms(self) -> dict[str, Tensor]:
        """{module: [batch]} ||V M U||_F^2 = sum((M (U Uᵀ) Mᵀ) * (Vᵀ V)): K x K Gram matrices only."""
        squared = {}
        for name, core in self.cores.items():
            u, v = (t.detach().float() for t in self.basis[name])
            m = core.detach().float()
            squared[name] = ((m @ (u @ u.T) @ m.mT) * (v.T @ v)).sum((1, 2))
        return squared

    def lora(self) -> LoRADelta:
        """The same update as per-row LoRA factors of rank K: A_b = U, B_b = V M_b (exact)."""
        factors = {}
        for name, core in self.cores.items():
            u, v = self.basis[name]
            factors[name] = (u.expand(core.shape[0], -1, -1), v @ core)
        return LoRADelta(factors, self.scale)

    def mean(self) -> BasisDelta:
        """The exact mean update over the rows, as one row: the mean core."""
        return self._map(lambda m: m.mean(0, keepdim=True))

    def scaled(self, factor: float) -> BasisDelta:
        """This delta times `factor` (basis and cores shared, only `scale` changes)."""
        return BasisDelta(self.basis, self.cores, self.scale * factor)

    def zero_rows(self, rows: Tensor) -> BasisDelta:
        """The cores of the rows in bool mask `rows` [batch] set to zero: those rows patch nothing."""
        mask = rows.reshape(-1, 1, 1)
        return self._map(lambda m: m.masked_fill(mask, 0))

    def expand(self, n: int) -> BasisDelta:
        """Repeat each row n times in place (row b becomes rows b*n .. b*n+n-1), as generate() does."""
        return self if n == 1 else self._map(lambda m: m.repeat_interleave(n, dim=0))

    def select(self, rows: Tensor | slice) -> BasisDelta:
        """Keep only the given rows (an index, a slice or a boolean mask over the batch)."""
        return self._map(lambda m: m[rows])

    def to(self, device=None, dtype=None) -> BasisDelta:
        basis = {k: (u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
                 for k, (u, v) in self.basis.items()}
        return BasisDelta(basis, {k: m.to(device=device, dtype=dtype) for k, m in self.cores.items()}, self.scale)

    def detach(self) -> BasisDelta:
        basis = {k: (u.detach(), v.detach()) for k, (u, v) in self.basis.items()}
        return BasisDelta(basis, {k: m.detach() for k, m in self.cores.items()}, self.scale)

    def _map(self, fn) -> BasisDelta:
        return BasisDelta(self.basis, {k: fn(m) for k, m in self.cores.items()}, self.scale)

    @staticmethod
    def concat(deltas: Sequence[BasisDelta], weights: Sequence[float | Tensor] | None = None) -> BasisDelta:
        """Exact sum of weighted deltas on one basis: the cores add, sum_s w_s * scale_s/scale * M_s.

        A weight may be a float, a 0-d tensor or a [batch] tensor (one weight per row); tensors
        keep their gradient.

        Raises:
            DeltaError: no deltas, other bases, mismatched batch sizes, or a weight count that differs.
        """
        weights = concat_weights(deltas, weights)
        first = _one_basis(deltas)
        cores = {}
        for name in first.cores:
            parts = []
            for delta, weight in zip(deltas, weights, strict=True):
                w = weight.reshape(-1, 1, 1) if isinstance(weight, Tensor) else weight
                parts.append(delta.cores[name] * (w * (delta.scale / first.scale)))
            cores[name] = sum(parts[1:], parts[0])
        return BasisDelta(first.basis, cores, first.scale)

    @staticmethod
    def stack_rows(deltas: Sequence[BasisDelta]) -> BasisDelta:
        """One delta whose rows are the rows of `deltas`, in order (one basis, one scale).

        Raises:
            DeltaError: no deltas, or deltas on other bases or scales.
        """
        if not deltas:
            raise DeltaError("stack_rows needs at least one delta")
        first = _one_basis(deltas)
        if any(d.scale != first.scale for d in deltas):
            raise DeltaError("stack_rows needs deltas of the same scale")
        return BasisDelta(first.basis, {k: torch.cat([d.cores[k] for d in deltas]) for k in first.cores},
                          first.scale)

    def save(self, path: str | Path) -> None:
        """Write basis and cores to a safetensors file atomically."""
        tensors = {}
        for name, (u, v) in self.basis.items():
            tensors[f"{name}/U"], tensors[f"{name}/V"] = u.detach().contiguous(), v.detach().contiguous()
            tensors[f"{name}/M"] = self.cores[name].detach().contiguous()
        atomic_write_safetensors(tensors, path, {"tflow.kind": "basis_delta", "scale": json.dumps(self.scale)})

    @classmethod
    def load(cls, path: str | Path, device=None) -> BasisDelta:
        """Read a delta written by `save`.

        Raises:
            CheckpointError: missing, not safetensors, or not a basis delta file.
        """
        tensors, meta = read_safetensors(path, device=device)
        if meta.get("tflow.kind") != "basis_delta":
            raise CheckpointError(f"{path} is a safetensors file but not a tflow basis delta")
        names = sorted({key.rsplit("/", 1)[0] for key in tensors})
        try:
            basis = {n: (tensors[f"{n}/U"], tensors[f"{n}/V"]) for n in names}
            cores = {n: tensors[f"{n}/M"] for n in names}
        except KeyError as missing:
            raise CheckpointError(f"{path} lacks tensor {missing}; the file is incomplete") from None
        return cls(basis, cores, float(json.loads(meta["scale"])))


def _one_basis(deltas: Sequence[BasisDelta]) -> BasisDelta:
    """The first delta, after checking every delta names the same modules on the same U and V."""
    first = deltas[0]
    for delta in deltas[1:]:
        if delta.basis.keys() != first.basis.keys() or not all(
                _same(delta.basis[k][i], first.basis[k][i]) for k in first.basis for i in (0, 1)):
            raise DeltaError("basis deltas can only be summed or stacked on one shared basis "
                             "(the same generator's U and V); convert others with .lora()")
    return first


def _same(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.device != b.device or a.dtype != b.dtype:
        return False
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))
