"""ReceiverSpec: which linear modules of a receiver a delta targets, and the receiver's fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from tflow.errors import TargetError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """A receiver layout: the linear kinds of its decoder layers, and the part names its fused kinds stand for."""

    name: str
    linears: tuple[str, ...]
    fused: Mapping[str, str] = field(default_factory=dict)


# Keyed by config.model_type. Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: a part name
# targets its whole fused module, which carries one delta for the whole fused output.
FAMILIES = {
    "qwen3": Family("Qwen3", ALL_TARGETS),
    "qwen2": Family("Qwen2", ALL_TARGETS),
    "llama": Family("Llama", ALL_TARGETS),
    "mistral": Family("Mistral", ALL_TARGETS),
    "gemma2": Family("Gemma 2", ALL_TARGETS),
    "gemma3_text": Family("Gemma 3 (text)", ALL_TARGETS),
    "phi3": Family("Phi-3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                   {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}),
    "olmo2": Family("OLMo 2", ALL_TARGETS),
}


def register_family(model_type: str, family: Family) -> Family:
    """Make a receiver layout known by its `config.model_type`, so `ReceiverSpec.from_model` finds
    its linear kinds without targets named by hand.

    Raises:
        ValueError: a family is already registered for that model_type.
    """
    if model_type in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is already the {FAMILIES[model_type].name} family")
    FAMILIES[model_type] = family
    return family


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
    """The targeted modules of a receiver, layer by layer, for the layouts in `FAMILIES`."""

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

        `targets` None means every linear kind of the receiver's family; on a fused layout (Phi-3) a
        part name (`q_proj`) targets its fused module (`qkv_proj`). Named by hand, targets also
        work on a layout not in `FAMILIES`.

        Raises:
            TargetError: an unknown layout without targets named by hand, or a target kind or
                layer index the model does not have; the message lists the linear kinds (or the
                layer range) that exist.
        """
        config = getattr(model, "config", None)
        arch = architecture(model)
        family = FAMILIES.get(getattr(config, "model_type", None))
        blocks = decoder_layers(model)
        if targets is None and family is None:
            raise TargetError(
                f"{arch} is not a receiver layout tflow knows ({', '.join(f.name for f in FAMILIES.values())}); "
                "name the linear modules to patch by hand (recipe generator.targets and kv.targets, or targets=), "
                f"from: {', '.join(_linears(blocks[0][1])) or 'none (its decoder layers have no nn.Linear)'}"
            )
        asked = tuple(family.linears if targets is None else targets)
        if not asked:
            raise TargetError("targets is empty; choose from " + ", ".join(family.linears if family else ALL_TARGETS))
        fused = family.fused if family else {}
        targets = tuple(dict.fromkeys(fused.get(t, t) for t in asked))
        layers = tuple(range(len(blocks)) if layers is None else layers)
        bad_layers = [i for i in layers if not 0 <= i < len(blocks)]
        if bad_layers or not layers:
            raise TargetError(f"layers {list(bad_layers) or '[]'} not in the model's 0..{len(blocks) - 1}")
        available: dict[str, None] = {}
        modules = []
        for i in layers:
            prefix, block = blocks[i]
            linears = _linears(block)
            available.update(dict.fromkeys(linears))
            for kind in targets:
                if kind in linears:
                    sub, m = linears[kind]
                    modules.append(TargetModule(f"{prefix}.{sub}", i, kind, m.in_features, m.out_features))
        missing = [t for t in asked if fused.get(t, t) not in available]
        if missing:
            where = f"this {family.name} model ({arch}" if family else f"this model ({arch}"
            elsewhere = [f"{t} is a {' / '.join(f.name for f in FAMILIES.values() if t in f.linears)} kind"
                         for t in missing if family and any(t in f.linears for f in FAMILIES.values())]
            raise TargetError(
                f"target modules {missing} do not exist in {'; '.join([where, *elsewhere])}); "
                "its linear modules are: " + ", ".join(available)
            )
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


def architecture(model: nn.Module) -> str:
    """The model's architecture name as its config records it (else its class name)."""
    return (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks of a causal LM as (qualified name, module), in order.

    Finds the longest nn.ModuleList whose name ends in `layers` (model.model.layers for every
    layout in `FAMILIES`).

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


def _linears(block: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """The nn.Linear modules of a decoder block by kind (last name part): kind -> (name in block, module)."""
    return {n.rsplit(".", 1)[-1]: (n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)}
