"""Hot-patching per-row LoRA deltas into a model through persistent forward hooks.

Each targeted nn.Linear gets one forward hook, installed the first time it is patched and
kept for the life of the model. The hook reads the current delta from the model's slot and
adds `scale * B_b (A_b x_b)` per batch row with two batched matmuls; with an empty slot it
returns None, so the module's own output passes through untouched (bit-exact restore).
Attaching lays each module's factors out once (contiguous A and Bᵀ in the module's dtype), so
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

from tflow.delta import LoRADelta
from tflow.errors import PatchError


class _Factors:
    """One module's factors laid out for its hook: A [rows, r, in] and B transposed [rows, r, out].

    Both are contiguous and in the module's dtype, prepared once per attach: contiguous Bᵀ makes
    the second matmul several times faster than a strided view on CPU. `base` holds the delta's
    own rows, from which beam and return-sequence expansions are made.
    """

    __slots__ = ("a", "b_t", "rows", "scale", "base")

    def __init__(self, a: Tensor, b_t: Tensor, scale: float, base: _Factors | None = None):
        self.a, self.b_t, self.rows, self.scale = a, b_t, a.shape[0], scale
        self.base = self if base is None else base

    @classmethod
    def prepare(cls, a: Tensor, b: Tensor, scale: float, dtype: torch.dtype) -> _Factors:
        """a: [batch, r, in], b: [batch, out, r]; grad mode forced on, so gradients always reach both."""
        with torch.enable_grad():
            return cls(a.to(dtype).contiguous(), b.to(dtype).mT.contiguous(), scale)

    def expand(self, rows: int, name: str) -> _Factors:
        """These factors for a batch of `rows`, each row repeated in place as generate() repeats inputs."""
        base = self.base
        if rows == base.rows:
            return base
        if rows % base.rows:
            raise PatchError(
                f"{name} runs a batch of {rows} rows but the delta has {base.rows}; "
                "the batch must be the delta's or a whole multiple (beams, return sequences)"
            )
        n = rows // base.rows
        with torch.enable_grad():
            return _Factors(base.a.repeat_interleave(n, 0), base.b_t.repeat_interleave(n, 0), base.scale, base)


class _Slot:
    """The delta a model currently runs with, plus the hooks that read it."""

    def __init__(self, model: nn.Module):
        self._modules = dict(model.named_modules())
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._lock = threading.Lock()
        self.delta: LoRADelta | None = None
        # Filled and emptied in place: every hook holds this very dict, one lookup per call.
        self._live: dict[str, _Factors] = {}

    def install(self, names) -> None:
        new = [name for name in names if name not in self._handles]
        for name in new:
            self._handles[name] = self._modules[name].register_forward_hook(self._hook(name))
        if new:
            _guard_hooks_when_compiled()

    def attach(self, delta: LoRADelta) -> None:
        if not self._lock.acquire(blocking=False):
            raise PatchError(
                "this model is already patched (by another thread or an enclosing block); "
                "fuse the deltas with LoRADelta.concat, or serialise the calls"
            )
        try:
            live = {name: _Factors.prepare(a, b, delta.scale, _dtype(self._modules[name], a))
                    for name, (a, b) in delta.factors.items()}
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
            a, b_t = f.a, f.b_t
            if a.dtype != output.dtype:  # autocast, or a module whose weight is not its compute dtype
                a, b_t = a.to(output.dtype), b_t.to(output.dtype)
            h = torch.bmm(x if x.dtype == a.dtype else x.to(a.dtype), a.mT)
            if torch.is_grad_enabled():
                out = torch.baddbmm(output, h, b_t, alpha=f.scale)
            else:  # nothing records the fresh output, so add in place and spare a copy of it
                out = output.baddbmm_(h, b_t, alpha=f.scale)
            return out.squeeze(1) if flat else out

        return hook


def _guard_hooks_when_compiled() -> None:
    """Make torch.compile guard on module hooks, and drop the graphs traced without them.

    `skip_nnmodule_hook_guards` is the documented switch (torch.compiler_nn_module); it is on
    by default for speed, which would let a graph without our hooks run on a patched model.
    """
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch.compiler.reset()


def _dtype(module: nn.Module, a: Tensor) -> torch.dtype:
    """The dtype a module computes in: its weight's, unless that is not floating point (quantized)."""
    weight = getattr(module, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else a.dtype


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


def attach(model: nn.Module, delta: LoRADelta, *, validate: bool = True) -> None:
    """Put `delta` in the model's slot until `detach`; for loops where backward runs later.

    Raises:
        DeltaError: the delta does not fit the model.
        PatchError: the model is already patched.
    """
    if validate:
        delta.validate(model)
    s = slot(model)
    s.install(delta.factors)
    s.attach(delta)


def detach(model: nn.Module) -> None:
    """Empty the model's slot: it computes exactly what it computed before `attach`."""
    slot(model).detach()


@contextmanager
def patched(model: nn.Module, delta: LoRADelta, *, validate: bool = True) -> Iterator[nn.Module]:
    """Run `model` with `delta` added to its linear modules, per batch row, inside the block.

    For every module in the delta and every row b: y = W x + scale * B_b (A_b x). A batch that
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
