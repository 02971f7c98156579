"""LoRADelta: per-row low-rank factors for a model's linear modules."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tflow.errors import CheckpointError, DeltaError
from tflow.io import atomic_write_safetensors, read_safetensors
from tflow.lora.onehot import OneHotColumns, cat, columns_as_one_row, gram, pad_rank, product


def pad_right(t: Tensor, width: int, dim: int) -> Tensor:
    """`t` zero-padded at the end of `dim` to length `width`."""
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def linear_module(modules: dict[str, nn.Module], name: str) -> nn.Linear:
    """The nn.Linear a delta names, from `dict(model.named_modules())`.

    Raises:
        DeltaError: no such module, or not an nn.Linear (naming a few that are).
    """
    module = modules.get(name)
    if not isinstance(module, nn.Linear):
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        hint = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
        what = "is not an nn.Linear" if module is not None else "does not exist"
        raise DeltaError(f"delta module {name!r} {what} in the model; linear modules are e.g. {hint}")
    return module


def concat_weights(deltas: Sequence, weights: Sequence[float | Tensor] | None) -> list[float | Tensor]:
    """The weights of a concat (all 1 when None), after checking there are deltas of one batch size.

    Raises:
        DeltaError: no deltas, a weight count that differs, or mismatched batch sizes.
    """
    if not deltas:
        raise DeltaError("concat needs at least one delta")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise DeltaError(f"concat got {len(deltas)} deltas but {len(weights)} weights")
    if len({d.batch_size for d in deltas}) != 1:
        raise DeltaError(f"concat needs equal batch sizes, got {[d.batch_size for d in deltas]}")
    return weights


class FrobeniusNorms:
    """Norms of a delta's update from its `_squared_norms()` ({module: [batch] ||ΔW_b||_F²}) and `scale`."""

    def row_norms(self) -> Tensor:
        """Per-row Frobenius norm of the whole update: sqrt(sum over modules ||ΔW_b||_F^2).

        Returns [batch] float32; NaN or inf where a row's factors are not finite.
        """
        total = sum(self._squared_norms().values())
        return abs(self.scale) * total.clamp_min(0).sqrt()

    def module_row_norms(self) -> dict[str, Tensor]:
        """Per-module, per-row Frobenius norm ||ΔW_b||_F: {module_name: [batch] float32}."""
        return {name: abs(self.scale) * sq.clamp_min(0).sqrt() for name, sq in self._squared_norms().items()}


@dataclass(frozen=True)
class LoRADelta(FrobeniusNorms):
    """Low-rank update `scale * B_b A_b` for each named module and each batch row b.

    factors: {module_name: (A, B)} with A: [batch, rank, in_features] and
    B: [batch, out_features, rank], a tensor or `OneHotColumns` (a copy head's); names as in
    `model.named_modules()`.

    Raises:
        DeltaError: factors empty, not 3-D, or disagreeing on batch or rank.
    """

    factors: Mapping[str, tuple[Tensor, Tensor]]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.factors:
            raise DeltaError("LoRADelta needs at least one module in `factors`")
        batches = set()
        for name, pair in self.factors.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DeltaError(f"factors[{name!r}] must be a pair (A, B)")
            a, b = pair
            if a.dim() != 3 or b.dim() != 3:
                raise DeltaError(
                    f"{name}: A must be [batch, rank, in] and B [batch, out, rank]; "
                    f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
                )
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise DeltaError(
                    f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on batch or "
                    "rank (A: [batch, rank, in], B: [batch, out, rank])"
                )
            batches.add(a.shape[0])
        if len(batches) != 1:
            raise DeltaError(f"all modules need the same batch size, got {sorted(batches)}")
        object.__setattr__(self, "factors", dict(self.factors))

    @property
    def batch_size(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]

    @property
    def modules(self) -> tuple[str, ...]:
        """The names of the modules this delta patches."""
        return tuple(self.factors)

    @property
    def num_bytes(self) -> int:
        """Bytes held by all factors (what a weight-space message weighs)."""
        return sum(t.nbytes for pair in self.factors.values() for t in pair)

    def validate(self, model: nn.Module) -> None:
        """Check every module exists in `model`, is an nn.Linear, and matches the factor shapes.

        Raises:
            DeltaError: naming the module and both shapes.
        """
        modules = dict(model.named_modules())
        for name, (a, b) in self.factors.items():
            module = linear_module(modules, name)
            if a.shape[2] != module.in_features or b.shape[1] != module.out_features:
                raise DeltaError(
                    f"{name}: delta A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"Linear(in={module.in_features}, out={module.out_features}); "
                    "need A [batch, rank, in] and B [batch, out, rank]"
                )

    def _squared_norms(self) -> dict[str, Tensor]:
        """{module: [batch]} ||B_b A_b||_F^2 from r x r Gram matrices, sum((A Aᵀ) * (Bᵀ B)), never
        forming B A; where r² exceeds the update's out x in numbers (a static mean's copy head: r is
        every query's every sender token, 40800 for 200 relay queries, 6.7 GB a Gram), from B A
        itself, a row at a time."""
        squared = {}
        for name, (a, b) in self.factors.items():
            a, b = a.detach().float(), b.detach().float()
            if a.shape[1] ** 2 <= a.shape[2] * b.shape[1]:
                squared[name] = ((a @ a.mT) * gram(b)).sum((1, 2))
            else:
                squared[name] = torch.cat([product(a[i : i + 1], b[i : i + 1]).square().sum((1, 2))
                                           for i in range(a.shape[0])])
        return squared

    def lora(self) -> LoRADelta:
        """This delta as per-row LoRA factors: itself (`BasisDelta.lora` converts a basis delta)."""
        return self

    def mean(self) -> LoRADelta:
        """The exact mean update over the rows, as one row. `patched` applies a one-row delta to
        every row of a batch.

        (1/n) sum_b B_b A_b == cat_b(B_b / n) cat_b(A_b), a rank of batch * r. Where that rank
        exceeds min(in, out), the module's mean update ΔW is formed instead and held at rank
        min(in, out), with the narrower factor the identity (A = I, B = ΔW, or B = I, A = ΔW):
        the same update in fewer numbers (a SmolLM2 delta's static mean of 200 queries: 2.8 GB
        as concatenated ranks). One-hot B factors (a copy head's) stay concatenated.
        """
        n = self.batch_size
        factors = {}
        for name, (a, b) in self.factors.items():
            a, b = a.reshape(1, -1, a.shape[2]), columns_as_one_row(b / n)
            size = min(a.shape[2], b.shape[1])
            if not isinstance(b, OneHotColumns) and a.shape[1] > size:
                update = b @ a  # [1, out, in]
                eye = torch.eye(size, device=a.device, dtype=a.dtype)[None]
                a, b = (eye, update) if size == a.shape[2] else (update, eye)
            factors[name] = (a, b)
        return LoRADelta(factors, self.scale)

    def scaled(self, factor: float) -> LoRADelta:
        """This delta times `factor` (the factors are shared, only `scale` changes)."""
        return LoRADelta(self.factors, self.scale * factor)

    def zero_rows(self, rows: Tensor) -> LoRADelta:
        """This delta with the A and B of the rows in bool mask `rows` [batch] set to zero.

        A zeroed row patches nothing: the model computes exactly what it computes unpatched,
        even where that row's factors held NaN (zeroing B alone would leave NaN * 0).
        """
        mask = rows.reshape(-1, 1, 1)
        return self._map(lambda t: t.masked_fill(mask, 0))

    def expand(self, n: int) -> LoRADelta:
        """Repeat each row n times in place (row b becomes rows b*n .. b*n+n-1), as generate() does."""
        if n == 1:
            return self
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, rows: Tensor) -> LoRADelta:
        """Keep only the given rows (an index or boolean mask over the batch)."""
        return self._map(lambda t: t[rows])

    def to(self, device=None, dtype=None) -> LoRADelta:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> LoRADelta:
        return self._map(lambda t: t.detach())

    def _map(self, fn) -> LoRADelta:
        return LoRADelta({k: (fn(a), fn(b)) for k, (a, b) in self.factors.items()}, self.scale)

    @staticmethod
    def concat(deltas: Sequence[LoRADelta], weights: Sequence[float | Tensor] | None = None) -> LoRADelta:
        """Exact sum of weighted deltas as one delta of the summed rank.

        sum_s w_s * scale_s * B_s A_s == scale * cat_s(w_s * scale_s/scale * B_s) cat_s(A_s),
        so patching with the result equals patching with every delta at once. A weight may be a
        float, a 0-d tensor or a [batch] tensor (one weight per row); tensors keep their gradient.

        Raises:
            DeltaError: no deltas, mismatched batch sizes, or a weight count that differs.
        """
        weights = concat_weights(deltas, weights)
        scale = deltas[0].scale
        names = list(dict.fromkeys(name for d in deltas for name in d.factors))
        factors = {}
        for name in names:
            a_parts, b_parts = [], []
            for delta, weight in zip(deltas, weights, strict=True):
                if name not in delta.factors:
                    continue
                a, b = delta.factors[name]
                w = weight.reshape(-1, 1, 1) if isinstance(weight, Tensor) else weight
                a_parts.append(a)
                b_parts.append(b * (w * (delta.scale / scale)))
            factors[name] = (torch.cat(a_parts, dim=1), cat(b_parts, dim=2))
        return LoRADelta(factors, scale)

    @staticmethod
    def stack_rows(deltas: Sequence[LoRADelta]) -> LoRADelta:
        """One delta whose rows are the rows of `deltas`, in order (same modules and scale).

        A module whose rank differs between the deltas (a copy head's rank is its batch's sender
        length) is zero-padded to the largest: a zero rank adds exactly nothing.

        Raises:
            DeltaError: no deltas, or deltas that differ in modules or scale.
        """
        if not deltas:
            raise DeltaError("stack_rows needs at least one delta")
        first = deltas[0]
        if any(d.factors.keys() != first.factors.keys() or d.scale != first.scale for d in deltas):
            raise DeltaError("stack_rows needs deltas of the same modules and scale")
        factors = {}
        for name in first.factors:
            rank = max(d.factors[name][0].shape[1] for d in deltas)
            factors[name] = (torch.cat([pad_right(d.factors[name][0], rank, 1) for d in deltas]),
                             cat([pad_rank(d.factors[name][1], rank) for d in deltas], dim=0))
        return LoRADelta(factors, first.scale)

    def save(self, path: str | Path) -> None:
        """Write the delta to a safetensors file atomically."""
        tensors, one_hot = {}, {}
        for name, (a, b) in self.factors.items():
            tensors[f"{name}/A"] = a.detach().contiguous()
            if isinstance(b, OneHotColumns):
                tensors[f"{name}/B.ids"], tensors[f"{name}/B.values"] = b.ids.contiguous(), b.values.detach().contiguous()
                one_hot[name] = b.out
            else:
                tensors[f"{name}/B"] = b.detach().contiguous()
        meta = {"tflow.kind": "lora_delta", "scale": json.dumps(self.scale), "one_hot": json.dumps(one_hot)}
        atomic_write_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path, device=None) -> LoRADelta:
        """Read a delta written by `save`.

        Raises:
            CheckpointError: missing, not safetensors, or not a delta file.
        """
        tensors, meta = read_safetensors(path, device=device)
        if meta.get("tflow.kind") != "lora_delta":
            raise CheckpointError(f"{path} is a safetensors file but not a tflow LoRA delta")
        names = sorted({key.rsplit("/", 1)[0] for key in tensors})
        one_hot = json.loads(meta.get("one_hot", "{}"))
        try:
            factors = {n: (tensors[f"{n}/A"], OneHotColumns(tensors[f"{n}/B.ids"], tensors[f"{n}/B.values"], one_hot[n])
                           if n in one_hot else tensors[f"{n}/B"]) for n in names}
        except KeyError as missing:
            raise CheckpointError(f"{path} lacks tensor {missing}; the file is incomplete") from None
        return cls(factors, float(json.loads(meta["scale"])))
