"""Devices and dtypes checked against this machine: a recipe's `model.device` resolved to one that
exists, and a dtype refused where the device cannot compute in it, each before any weights load."""

from __future__ import annotations

import functools

import torch

from tflow.errors import DeviceError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def present() -> list[str]:
    """The devices this machine has, as `model.device` names them: cpu, then cuda:0.., then mps."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def resolve(name: str, key: str = "model.device") -> torch.device:
    """The device `name` (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) means here; `auto` is the first
    CUDA device when there is one, else the CPU. `key` is the setting that named it, for the message.

    Raises:
        DeviceError: the device does not exist on this machine (the ones that do are named).
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{key} {name!r}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if str(device) in present():
        return device
    devices = present()
    kind = {"cuda": "CUDA", "mps": "MPS"}.get(device.type)
    missing = (f"{kind} is not available here" if kind and not any(d.startswith(device.type) for d in devices)
               else "no such device here")
    fix = " or ".join(dict.fromkeys([*(d for d in devices if d.startswith(device.type)), "cpu", "auto"]))
    raise DeviceError(f"{key} {name!r}: {missing}; devices present: {', '.join(devices)} (set {key}: {fix})")


def check_dtype(dtype: torch.dtype, device: torch.device, key: str, fix: str) -> None:
    """Refuse `dtype` where `device` cannot compute in it: a CUDA card without bfloat16, or a CPU
    or other device whose kernels fail on a small matmul and softmax in it. `key` is the recipe key
    that asked for it (`model.dtype 'bfloat16'`), `fix` the setting that runs instead.

    Raises:
        DeviceError: naming the key, the device, and `fix`.
    """
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"{key}: {torch.cuda.get_device_name(device)} ({device}) has no native bfloat16; {fix}")
    failure = _fails(device, dtype)
    if failure is not None:
        raise DeviceError(f"{key}: {device} cannot compute in {name} here ({failure}); {fix}")


@functools.cache
def _fails(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a small matmul and softmax in `dtype` on `device` fails (None: it runs)."""
    try:
        x = torch.ones(2, 4, dtype=dtype, device=device)
        (x @ x.T).softmax(-1).sum().item()
    except (RuntimeError, TypeError) as err:
        return first_line(err)
    return None


def agents_device(recipe) -> torch.device:
    """The one device every agent of `recipe` runs on (each backbone's `device`, resolved here).

    Raises:
        DeviceError: a device that does not exist here, or agents on different devices (senders and
            receiver run on one device: the generator reads the senders' states where the receiver is).
    """
    sections = [(f"senders.{i}.model", s.model) for i, s in enumerate(recipe.senders) if s.model is not None]
    if recipe.receiver.model is not None:
        sections.append(("receiver.model", recipe.receiver.model))
    if len(sections) <= len(recipe.senders):  # an agent without a backbone of its own runs the top-level one
        sections.insert(0, ("model", recipe.model))
    found = {where: resolve(section.device, f"{where}.device") for where, section in sections}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{where}.device -> {device}" for where, device in found.items())
        raise DeviceError(f"the agents run on one device, but the recipe puts them on several ({listed}); "
                          "give every backbone the same device")
    return next(iter(found.values()))
