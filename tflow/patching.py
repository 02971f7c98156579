"""Hot-patching per-row LoRA deltas into a model through persistent forward hooks.

Each targeted nn.Linear gets one forward hook, installed the first time it is patched and
kept for the life of the model. The hook reads the current delta from the model's slot and
adds `scale * B_b (A_b x_b)` per batch row with two batched matmuls; with an empty slot it
returns None, so the module's own output passes through untouched (bit-exact restore).
Persistent hooks matter twice over: gradient checkpointing re-runs the forward during
backward, after a `with` block would already have removed per-call hooks, and a compiled
graph keeps the hooks that existed when it was traced.
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


class _Slot:
    """The delta a model currently runs with, plus the hooks that read it."""

    def __init__(self, model: nn.Module):
        self._modules = dict(model.named_modules())
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._lock = threading.Lock()
        self.delta: LoRADelta | None = None
        self._factors: dict[tuple[str, int, torch.dtype], tuple[Tensor, Tensor]] = {}

    def install(self, names) -> None:
        for name in names:
            if name not in self._handles:
                self._handles[name] = self._modules[name].register_forward_hook(self._hook(name))

    def attach(self, delta: LoRADelta) -> None:
        if not self._lock.acquire(blocking=False):
            raise PatchError(
                "this model is already patched (by another thread or an enclosing block); "
                "fuse the deltas with LoRADelta.concat, or serialise the calls"
            )
        self._factors.clear()
        self.delta = delta

    def detach(self) -> None:
        self.delta = None
        self._factors.clear()
        if self._lock.locked():
            self._lock.release()

    def factors(self, name: str, rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The (A, B) of `name` for a batch of `rows`, expanded like generate() expands inputs."""
        key = (name, rows, dtype)
        cached = self._factors.get(key)
        if cached is not None:
            return cached
        a, b = self.delta.factors[name]
        batch = a.shape[0]
        if rows != batch:
            if rows % batch:
                raise PatchError(
                    f"{name} runs a batch of {rows} rows but the delta has {batch}; "
                    "the batch must be the delta's or a whole multiple (beams, return sequences)"
                )
            a, b = a.repeat_interleave(rows // batch, 0), b.repeat_interleave(rows // batch, 0)
        pair = (a.to(dtype), b.to(dtype).mT)
        self._factors[key] = pair
        return pair

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            delta = self.delta
            if delta is None or name not in delta.factors:
                return None
            x = args[0]
            flat = x.dim() == 2
            if flat:
                x, output = x.unsqueeze(1), output.unsqueeze(1)
            a, b_t = self.factors(name, x.shape[0], output.dtype)
            out = torch.baddbmm(output, torch.bmm(x.to(a.dtype), a.mT), b_t, alpha=delta.scale)
            return out.squeeze(1) if flat else out

        return hook


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def slot(model: nn.Module) -> _Slot:
    """The model's slot, created on first use."""
    with _SLOTS_LOCK:
        found = _SLOTS.get(model)
        if found is None:
            found = _SLOTS[model] = _Slot(model)
        return found


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
