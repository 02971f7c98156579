"""Hot-patching per-row LoRA deltas into a model through persistent forward hooks.

Each targeted nn.Linear gets one forward hook, installed the first time it is patched and
kept for the life of the model. The hook reads the current delta from the model's slot and
adds `scale * B_b (A_b x_b)` per batch row with two batched matmuls (a `BasisDelta`: `scale * V
M_b U x_b`, with U and V as dense matmuls for the whole batch); with an empty slot it
returns None, so the module's own output passes through untouched (bit-exact restore).
Attaching lays each module's factors out once (contiguous A and Bᵀ on the module's device, in its
dtype), so
a call costs one dict lookup and two matmuls; under no_grad the update is added in place.
Persistent hooks matter twice over: gradient checkpointing re-runs the forward during
backward, after a `with` block would already have removed per-call hooks, and a compiled
graph keeps the hooks that existed when it was traced. By default torch.compile does not guard
on hooks, and would run a graph traced without them (this model before its first patch, or an
unpatched twin of the same architecture) with no delta; installing hooks turns those guards on
and drops the graphs traced before.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tflow.errors import PatchError
from tflow.lora.basis import BasisDelta
from tflow.lora.delta import LoRADelta
from tflow.lora.onehot import OneHotColumns


class _Factors:
    """One module's factors laid out for its hook: A [rows, r, in] and B transposed [rows, r, out].

    Both are contiguous, on the module's device and in its dtype, prepared once per attach: contiguous Bᵀ makes
    the second matmul several times faster than a strided view on CPU. A one-hot B (a copy
    head's) stays as its ids and values, and the hook scatters its votes. `base` holds the
    delta's own rows, from which beam and return-sequence expansions are made.
    """

    __slots__ = ("a", "b_t", "rows", "scale", "base")

    def __init__(self, a: Tensor, b_t: Tensor, scale: float, base: _Factors | None = None):
        self.a, self.b_t, self.rows, self.scale = a, b_t, a.shape[0], scale
        self.base = self if base is None else base

    @classmethod
    def prepare(cls, a: Tensor, b: Tensor, scale: float, device: torch.device, dtype: torch.dtype) -> _Factors:
        """a: [batch, r, in], b: [batch, out, r]; grad mode forced on, so gradients always reach both."""
        with torch.enable_grad():
            b = b.to(device=device, dtype=dtype)
            return cls(a.to(device=device, dtype=dtype).contiguous(), b if isinstance(b, OneHotColumns) else b.mT.contiguous(),
                       scale)

    def expand(self, rows: int, name: str) -> _Factors:
        """These factors for a batch of `rows`, each row repeated in place as generate() repeats inputs.

        A one-row delta (a static mean, rank batch * r) is never copied: `add` applies it to every row.
        """
        base = self.base
        if rows == base.rows or base.rows == 1:
            return base
        n = _repeats(rows, base.rows, name)
        with torch.enable_grad():
            return _Factors(base.a.repeat_interleave(n, 0), base.b_t.repeat_interleave(n, 0), base.scale, base)

    def add(self, x: Tensor, output: Tensor) -> Tensor:
        """output + scale * B_b (A_b x_b) per row; x: [rows, T, in], output: [rows, T, out].

        With one row of factors and more rows of x, that row serves them all (two dense matmuls).
        """
        a, b_t = self.a, self.b_t
        if a.dtype != output.dtype:  # autocast, or a module whose weight is not its compute dtype
            a, b_t = a.to(output.dtype), b_t.to(output.dtype)
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        shared = self.rows != x.shape[0]
        h = torch.matmul(x, a[0].mT) if shared else torch.bmm(x, a.mT)
        if isinstance(b_t, OneHotColumns):
            return b_t.add_product(output, h, self.scale)
        if shared:
            return _add_flat(output, h.flatten(0, 1), b_t[0], self.scale)
        if torch.is_grad_enabled():
            return torch.baddbmm(output, h, b_t, alpha=self.scale)
        return output.baddbmm_(h, b_t, alpha=self.scale)  # nothing records the fresh output: spare a copy


class _BasisFactors:
    """One module's basis delta laid out for its hook: U [K, in], Vᵀ [K, out], cores transposed [rows, K, K].

    The hook reads U and V once for the whole batch (two dense matmuls) and each row's own core
    (a K x K bmm): K·(in + out) + rows·K² numbers a step instead of rows·r·(in + out).
    """

    __slots__ = ("u", "v_t", "m_t", "rows", "scale", "base")

    def __init__(self, u: Tensor, v_t: Tensor, m_t: Tensor, scale: float, base: _BasisFactors | None = None):
        self.u, self.v_t, self.m_t, self.rows, self.scale = u, v_t, m_t, m_t.shape[0], scale
        self.base = self if base is None else base

    @classmethod
    def prepare(cls, u: Tensor, v: Tensor, m: Tensor, scale: float, device: torch.device,
                dtype: torch.dtype) -> _BasisFactors:
        """u: [K, in], v: [out, K], m: [batch, K, K]; grad mode forced on, so gradients reach all three."""
        with torch.enable_grad():
            u, v, m = (t.to(device=device, dtype=dtype) for t in (u, v, m))
            return cls(u.contiguous(), v.T.contiguous(), m.mT.contiguous(), scale)

    def expand(self, rows: int, name: str) -> _BasisFactors:
        """These factors for a batch of `rows`, each row's core repeated in place as generate() repeats inputs."""
        base = self.base
        if rows == base.rows:
            return base
        n = _repeats(rows, base.rows, name)
        with torch.enable_grad():
            return _BasisFactors(base.u, base.v_t, base.m_t.repeat_interleave(n, 0), base.scale, base)

    def add(self, x: Tensor, output: Tensor) -> Tensor:
        """output + scale * V M_b U x_b per row; x: [rows, T, in], output: [rows, T, out]."""
        u, v_t, m_t = self.u, self.v_t, self.m_t
        if u.dtype != output.dtype:
            u, v_t, m_t = u.to(output.dtype), v_t.to(output.dtype), m_t.to(output.dtype)
        h = torch.bmm(torch.matmul(x if x.dtype == u.dtype else x.to(u.dtype), u.T), m_t).flatten(0, 1)
        return _add_flat(output, h, v_t, self.scale)


def _add_flat(output: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """output + scale * h @ weight over every token of every row at once; h: [rows * T, k],
    weight: [k, out], output: [rows, T, out]; in place when no gradient is recorded."""
    flat = output.view(-1, output.shape[-1])
    if torch.is_grad_enabled():
        return torch.addmm(flat, h, weight, alpha=scale).view_as(output)
    flat.addmm_(h, weight, alpha=scale)
    return output


class _Slot:
    """The delta a model currently runs with, plus the hooks that read it."""

    def __init__(self, model: nn.Module):
        self._modules = dict(model.named_modules())
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._lock = threading.Lock()
        self.delta: LoRADelta | BasisDelta | None = None
        # Filled and emptied in place: every hook holds this very dict, one lookup per call.
        self._live: dict[str, _Factors | _BasisFactors] = {}

    def install(self, names) -> None:
        new = [name for name in names if name not in self._handles]
        for name in new:
            self._handles[name] = self._modules[name].register_forward_hook(self._hook(name))
        if new:
            _guard_hooks_when_compiled()

    def attach(self, delta: LoRADelta | BasisDelta) -> None:
        if not self._lock.acquire(blocking=False):
            raise PatchError(
                "this model is already patched (by another thread or an enclosing block); "
                "fuse the deltas with LoRADelta.concat, or serialise the calls"
            )
        try:
            live = _layout(delta, self._modules)
        except BaseException:
            self._lock.release()
            raise
        self._live.update(live)
        self.delta = delta

    def detach(self) -> None:
        self.delta = None
        self._live.clear()
        if self._lock.locked():
            self._lock.release()

    def _hook(self, name: str):
        live = self._live

        def hook(module: nn.Module, args: tuple, output: Tensor):
            f = live.get(name)
            if f is None:
                return None
            x = args[0]
            if x.shape[0] != f.rows:
                f = live[name] = f.expand(x.shape[0], name)
            flat = x.dim() == 2
            if flat:
                x, output = x.unsqueeze(1), output.unsqueeze(1)
            out = f.add(x, output)
            return out.squeeze(1) if flat else out

        return hook


def _repeats(rows: int, delta_rows: int, name: str) -> int:
    """How many times each delta row repeats in a batch of `rows` (beams, return sequences).

    Raises:
        PatchError: `rows` is not a whole multiple of the delta's rows.
    """
    if rows % delta_rows:
        raise PatchError(
            f"{name} runs a batch of {rows} rows but the delta has {delta_rows}; "
            "the batch must be the delta's or a whole multiple (beams, return sequences)"
        )
    return rows // delta_rows


def _layout(delta: LoRADelta | BasisDelta, modules: dict[str, nn.Module]) -> dict[str, _Factors | _BasisFactors]:
    """Each module's factors in the layout its hook reads, on the module's device and in its dtype."""
    if isinstance(delta, BasisDelta):
        return {name: _BasisFactors.prepare(u, v, delta.cores[name], delta.scale, *_placement(modules[name], u))
                for name, (u, v) in delta.basis.items()}
    return {name: _Factors.prepare(a, b, delta.scale, *_placement(modules[name], a))
            for name, (a, b) in delta.factors.items()}


def _guard_hooks_when_compiled() -> None:
    """Make torch.compile guard on module hooks, and drop the graphs traced without them.

    `skip_nnmodule_hook_guards` is the documented switch (torch.compiler_nn_module); it is on
    by default for speed, which would let a graph without our hooks run on a patched model.
    """
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch.compiler.reset()


def _placement(module: nn.Module, a: Tensor) -> tuple[torch.device, torch.dtype]:
    """Where a module computes: its weight's device, and its weight's dtype unless that is not
    floating point (quantized), when the factors keep their own."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return a.device, a.dtype
    return weight.device, weight.dtype if weight.is_floating_point() else a.dtype


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def slot(model: nn.Module) -> _Slot:
    """The model's slot, created on first use."""
    with _SLOTS_LOCK:
        found = _SLOTS.get(model)
        if found is None:
            found = _SLOTS[model] = _Slot(model)
        return found


def is_patched(model: nn.Module) -> bool:
    """Whether a delta is attached to `model` now."""
    found = _SLOTS.get(model)
    return found is not None and found.delta is not None


def attach(model: nn.Module, delta: LoRADelta | BasisDelta, *, validate: bool = True) -> None:
    """Put `delta` in the model's slot until `detach`; for loops where backward runs later.

    Raises:
        DeltaError: the delta does not fit the model.
        PatchError: the model is already patched.
    """
    if validate:
        delta.validate(model)
    s = slot(model)
    s.install(delta.modules)
    s.attach(delta)


def detach(model: nn.Module) -> None:
    """Empty the model's slot: it computes exactly what it computed before `attach`."""
    slot(model).detach()


@contextmanager
def patched(model: nn.Module, delta: LoRADelta | BasisDelta, *, validate: bool = True) -> Iterator[nn.Module]:
    """Run `model` with `delta` added to its linear modules, per batch row, inside the block.

    For every module in the delta and every row b: y = W x + scale * B_b (A_b x) (or, for a
    BasisDelta, y = W x + scale * V M_b (U x)). A batch that
    is a whole multiple of the delta's (beams, num_return_sequences) repeats each row's delta
    in place, as generate() repeats the inputs. On exit, normal or not, the model is restored
    bit-exactly. With gradient checkpointing, call backward() inside the block.

    Raises:
        DeltaError: the delta does not fit the model.
        PatchError: the model is already patched (another thread or an enclosing block).
    """
    attach(model, delta, validate=validate)
    try:
        yield model
    finally:
        detach(model)
