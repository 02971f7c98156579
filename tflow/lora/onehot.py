"""OneHotColumns: a LoRA B factor with one nonzero per column, held as its ids and values.

A copy head's B (`tflow/copy_head.py`) has a column per sender token, one-hot over the
receiver's vocabulary. Dense, that is vocab x rank floats a row: 50 MB a query on SmolLM2, read
at every decode step and summed in the norm guard's Gram matrix. Held as ids and values it is
2 x rank numbers a row, the hook adds its votes with one scatter, and its Gram matrix is a
comparison of ids. It answers the tensor operations `LoRADelta` applies to a B factor
(shape, products with weights, masking, row selection and repetition, dtype and device), and
the functions below dispatch the rest (concatenation, padding, Gram matrices, densifying).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tflow.errors import DeltaError


class OneHotColumns:
    """B [batch, out, rank] with B[b, ids[b, k], k] = values[b, k] and zeros elsewhere.

    ids: [batch, rank] integer, values: [batch, rank] floating point, out: the vocabulary.

    Raises:
        DeltaError: ids and values disagree in shape, are not 2-D, or an id is outside [0, out).
    """

    __slots__ = ("ids", "values", "out")

    def __init__(self, ids: Tensor, values: Tensor, out: int):
        if ids.dim() != 2 or ids.shape != values.shape:
            raise DeltaError(f"one-hot B needs ids and values of one [batch, rank] shape, got "
                             f"{tuple(ids.shape)} and {tuple(values.shape)}")
        if ids.is_floating_point() or (ids.numel() and (ids.min() < 0 or ids.max() >= out)):
            raise DeltaError(f"one-hot B needs integer ids in [0, {out}), the output size")
        self.ids, self.values, self.out = ids, values, out

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.ids.shape[0], self.out, self.ids.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.values.nbytes

    def dim(self) -> int:
        return 3

    def _with(self, ids: Tensor, values: Tensor) -> OneHotColumns:
        return OneHotColumns(ids, values, self.out)

    def __mul__(self, weight: float | Tensor) -> OneHotColumns:
        """B times a float, a 0-d tensor or a [batch, 1, 1] tensor (one weight per row)."""
        w = weight.reshape(-1, 1) if isinstance(weight, Tensor) else weight
        return self._with(self.ids, self.values * w)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> OneHotColumns:
        return self._with(self.ids, self.values / divisor)

    def __getitem__(self, rows) -> OneHotColumns:
        return self._with(self.ids[rows], self.values[rows])

    def masked_fill(self, mask: Tensor, value: float) -> OneHotColumns:
        """Rows in `mask` ([batch, 1, 1] bool) set to `value` (0: the row adds nothing)."""
        if value != 0:
            raise DeltaError("a one-hot B can only be masked with zeros")
        return self._with(self.ids, self.values.masked_fill(mask.reshape(-1, 1), 0))

    def repeat_interleave(self, n: int, dim: int = 0) -> OneHotColumns:
        if dim != 0:
            raise DeltaError("a one-hot B repeats along its batch only")
        return self._with(self.ids.repeat_interleave(n, 0), self.values.repeat_interleave(n, 0))

    def to(self, device=None, dtype=None) -> OneHotColumns:
        if isinstance(device, torch.dtype):  # .to(dtype), as on a tensor
            device, dtype = None, device
        return self._with(self.ids.to(device=device), self.values.to(device=device, dtype=dtype))

    def detach(self) -> OneHotColumns:
        return self._with(self.ids, self.values.detach())

    def float(self) -> OneHotColumns:
        return self.to(dtype=torch.float32)

    def cpu(self) -> OneHotColumns:
        return self.to(device="cpu")

    def contiguous(self) -> OneHotColumns:
        return self._with(self.ids.contiguous(), self.values.contiguous())

    def add_product(self, output: Tensor, h: Tensor, scale: float) -> Tensor:
        """output + scale * (B hᵀ)ᵀ per row; h: [rows, T, rank] (A x), output: [rows, T, out]; B has rows or 1 row.

        One scatter-add of each rank's vote onto its id; in place when no gradient is recorded.
        """
        index = self.ids[:, None, :].expand(h.shape[0], h.shape[1], -1)  # one row of ids serves every row
        votes = h * (self.values[:, None, :] * scale)
        if torch.is_grad_enabled():
            return output.scatter_add(-1, index, votes)
        return output.scatter_add_(-1, index, votes)


def cat(parts: Sequence[Tensor | OneHotColumns], dim: int) -> Tensor | OneHotColumns:
    """torch.cat of B factors along batch (dim 0) or rank (dim 2), one-hot or dense alike."""
    if not isinstance(parts[0], OneHotColumns):
        return torch.cat(list(parts), dim=dim)
    if dim not in (0, 2) or any(not isinstance(p, OneHotColumns) or p.out != parts[0].out for p in parts):
        raise DeltaError("one-hot B factors concatenate with one-hot factors of one size, along batch or rank")
    axis = 0 if dim == 0 else 1
    return OneHotColumns(torch.cat([p.ids for p in parts], axis), torch.cat([p.values for p in parts], axis),
                         parts[0].out)


def pad_rank(b: Tensor | OneHotColumns, rank: int) -> Tensor | OneHotColumns:
    """B zero-padded to `rank` columns: a zero column adds exactly nothing."""
    extra = rank - b.shape[2]
    if extra == 0:
        return b
    if isinstance(b, OneHotColumns):
        return OneHotColumns(torch.cat([b.ids, b.ids.new_zeros(b.ids.shape[0], extra)], 1),
                             torch.cat([b.values, b.values.new_zeros(b.values.shape[0], extra)], 1), b.out)
    return torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], extra)], dim=2)


def gram(b: Tensor | OneHotColumns) -> Tensor:
    """Bᵀ B per row, [batch, rank, rank]: for one-hot columns values_j values_k where ids agree."""
    if isinstance(b, OneHotColumns):
        same = b.ids[:, :, None] == b.ids[:, None, :]
        return same * (b.values[:, :, None] * b.values[:, None, :])
    return b.mT @ b


def product(a: Tensor, b: Tensor | OneHotColumns) -> Tensor:
    """B A per row, [batch, out, in]; a one-hot B's ranks each add their A row, times their value,
    onto their id's row, so B is never made dense."""
    if not isinstance(b, OneHotColumns):
        return b @ a
    votes = b.values[:, :, None] * a  # [batch, rank, in]
    index = b.ids[:, :, None].expand(-1, -1, a.shape[2])
    return a.new_zeros(a.shape[0], b.out, a.shape[2]).scatter_add_(1, index, votes)


def flat_columns_gram(b: Tensor | OneHotColumns, rows: slice = slice(None)) -> Tensor:
    """The Gram matrix of the columns of the batch rows `rows` against every row's every column,
    [len(rows) * rank, batch * rank] (row-major); all rows: the whole Gram matrix."""
    if isinstance(b, OneHotColumns):
        ids, values = b.ids.reshape(-1), b.values.reshape(-1)
        some_ids, some_values = b.ids[rows].reshape(-1), b.values[rows].reshape(-1)
        return (some_ids[:, None] == ids[None, :]) * (some_values[:, None] * values[None, :])
    columns = b.mT.reshape(-1, b.shape[1])
    return b[rows].mT.reshape(-1, b.shape[1]) @ columns.T


def columns_as_one_row(b: Tensor | OneHotColumns) -> Tensor | OneHotColumns:
    """[batch, out, r] -> [1, out, batch * r]: every row's columns side by side, row-major."""
    if isinstance(b, OneHotColumns):
        return OneHotColumns(b.ids.reshape(1, -1), b.values.reshape(1, -1), b.out)
    return b.permute(1, 0, 2).reshape(1, b.shape[1], -1)


def dense(b: Tensor | OneHotColumns) -> Tensor:
    """B as a dense tensor [batch, out, rank] (for export; the gradient reaches the values)."""
    if not isinstance(b, OneHotColumns):
        return b
    zeros = b.values.new_zeros(b.shape)
    return zeros.scatter(1, b.ids[:, None, :], b.values[:, None, :])
