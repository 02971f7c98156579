"""ReceiverSpec: which linear modules of a receiver a delta targets, and the receiver's fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from tflow.errors import TargetError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TargetModule:
    """One targeted nn.Linear: its full name, decoder layer, kind (e.g. `q_proj`) and shape."""

    name: str
    layer: int
    kind: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ReceiverSpec:
    """The targeted modules of a receiver, layer by layer, for Qwen3/Qwen2/Llama/Mistral layouts."""

    architecture: str
    hidden_size: int
    num_layers: int
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    modules: tuple[TargetModule, ...]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        targets: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
    ) -> ReceiverSpec:
        """Find the targeted linears in every (or the given) decoder layer.

        Raises:
            TargetError: a target kind or layer index the model does not have; the message
                lists the linear kinds (or the layer range) that exist.
        """
        targets = tuple(ALL_TARGETS if targets is None else targets)
        if not targets:
            raise TargetError("targets is empty; choose from " + ", ".join(ALL_TARGETS))
        blocks = decoder_layers(model)
        layers = tuple(range(len(blocks)) if layers is None else layers)
        bad_layers = [i for i in layers if not 0 <= i < len(blocks)]
        if bad_layers or not layers:
            raise TargetError(f"layers {list(bad_layers) or '[]'} not in the model's 0..{len(blocks) - 1}")
        available: dict[str, None] = {}
        modules = []
        for i in layers:
            prefix, block = blocks[i]
            linears = {n.rsplit(".", 1)[-1]: (n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            available.update(dict.fromkeys(linears))
            for kind in targets:
                if kind in linears:
                    sub, m = linears[kind]
                    modules.append(TargetModule(f"{prefix}.{sub}", i, kind, m.in_features, m.out_features))
        missing = [t for t in targets if t not in available]
        if missing:
            raise TargetError(
                f"target modules {missing} do not exist in this model; its linear modules are: "
                + ", ".join(available)
            )
        config = getattr(model, "config", None)
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        hidden = getattr(config, "hidden_size", None) or modules[0].in_features
        return cls(arch, int(hidden), len(blocks), targets, layers, tuple(modules))

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def fingerprint(self) -> dict:
        """What a checkpoint must match: architecture, sizes and every target's shape."""
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "modules": [[m.name, m.in_features, m.out_features] for m in self.modules],
        }

    def fingerprint_digest(self) -> str:
        """A short stable hash of `fingerprint()`, for display."""
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks of a causal LM as (qualified name, module), in order.

    Finds the longest nn.ModuleList whose name ends in `layers` (model.model.layers for
    Qwen3, Qwen2, Llama and Mistral).

    Raises:
        TargetError: no such list exists.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise TargetError(f"cannot find the decoder layers of {type(model).__name__} (no `layers` ModuleList)")
    name, blocks = best
    return [(f"{name}.{i}", block) for i, block in enumerate(blocks)]
