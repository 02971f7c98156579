"""Generator base: config resolution, masked pooling, and the detokenizer shared by every kind."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from einops import rearrange
from pydantic import ValidationError
from torch import Tensor, nn

from generators.settings import GeneratorSettings
from tflow.backbones.families import ReceiverSpec
from tflow.errors import RecipeError, TargetError
from tflow.lora.delta import LoRADelta

Factors = dict[str, tuple[Tensor, Tensor]]


def masked_mean(cond: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens only; a row without any real token pools to zeros.

    cond: [N, T, H], mask: [N, T] (True = real token) -> [N, H].
    """
    mask = mask.bool()
    total = torch.where(mask[..., None], cond, 0.0).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(cond.dtype)


class SlotHead(nn.Module):
    """Reads one d_model token per (layer, module kind) slot and emits each targeted module's part.

    Subclasses build their parameters per kind (`self.shapes`: kind -> (in, out)) and implement
    `emit(kind, tokens [N, layers of kind, d_model])`, one output per layer of that kind.

    Raises:
        TargetError: one module kind with different shapes in different layers.
    """

    def __init__(self, spec: ReceiverSpec):
        super().__init__()
        self.layers = tuple(spec.layers)
        self.kinds = tuple(dict.fromkeys(m.kind for m in spec.modules))
        self.names = tuple(spec.module_names)
        position = {layer: i for i, layer in enumerate(self.layers)}
        self.slot_names: dict[str, list[str]] = {k: [] for k in self.kinds}
        self.slot_layers: dict[str, list[int]] = {k: [] for k in self.kinds}
        self.shapes: dict[str, tuple[int, int]] = {}
        for m in spec.modules:
            if self.shapes.setdefault(m.kind, (m.in_features, m.out_features)) != (m.in_features, m.out_features):
                raise TargetError(
                    f"{m.kind} is {self.shapes[m.kind]} in one layer but {(m.in_features, m.out_features)} "
                    f"in {m.name}; a generator needs one (in, out) shape per target kind"
                )
            self.slot_names[m.kind].append(m.name)
            self.slot_layers[m.kind].append(position[m.layer])

    def forward(self, tokens: Tensor) -> dict:
        """tokens: [N, len(layers), len(kinds), d_model] -> {module name: what `emit` gives for it}."""
        out = {}
        for k, kind in enumerate(self.kinds):
            out.update(zip(self.slot_names[kind], self.emit(kind, tokens[:, self.slot_layers[kind], k]), strict=True))
        return {name: out[name] for name in self.names}

    def emit(self, kind: str, tokens: Tensor) -> Sequence:
        raise NotImplementedError


class Detokenizer(SlotHead):
    """Per-module-kind heads turning each slot's token into LoRA factors (A [N, r, in], B [N, out, r]).

    B heads start at exactly zero (weights and biases), so a fresh generator is a no-op; A heads
    start like a LoRA A: entries of std ~1/sqrt(in_features) for layer-normalised tokens.
    B is the B head's output times `head_scale`. Adam moves every weight by about lr per step,
    so without it one step moves each entry of B by about lr * d_model (a d_model-long sum of
    O(1) token entries), coherently in all modules: on a 30-layer receiver one step at lr 1e-3
    took a fresh delta's norm from 0 to 79 and the loss up. `head_scale = 1/d_model` keeps each
    step's change of B near lr, whatever d_model.
    """

    def __init__(self, spec: ReceiverSpec, d_model: int, rank: int, head_scale: float = 1.0):
        super().__init__(spec)
        self.rank = rank
        self.head_scale = head_scale
        self.a = nn.ModuleDict({k: nn.Linear(d_model, rank * i) for k, (i, _) in self.shapes.items()})
        self.b = nn.ModuleDict({k: nn.Linear(d_model, o * rank) for k, (_, o) in self.shapes.items()})
        for kind, (in_features, _) in self.shapes.items():
            nn.init.normal_(self.a[kind].weight, std=1.0 / math.sqrt(d_model * in_features))
            nn.init.zeros_(self.a[kind].bias)
            nn.init.zeros_(self.b[kind].weight)
            nn.init.zeros_(self.b[kind].bias)

    def emit(self, kind: str, tokens: Tensor) -> Sequence[tuple[Tensor, Tensor]]:
        """tokens: [N, l, d_model] -> l pairs (A [N, r, in], B [N, out, r])."""
        a = rearrange(self.a[kind](tokens), "n l (r i) -> l n r i", r=self.rank)
        b = rearrange(self.b[kind](tokens) * self.head_scale, "n l (o r) -> l n o r", r=self.rank)
        return list(zip(a.unbind(0), b.unbind(0), strict=True))


class Generator(nn.Module):
    """Maps per-(sender, query) conditioning to LoRA factors for every module of `spec`.

    Subclasses register with `generators.register(kind)`, subclass `Settings` for knobs of their
    own, and implement `forward`.

    Raises:
        RecipeError: every unknown key or invalid value in `config`, all at once.
    """

    Settings: ClassVar[type[GeneratorSettings]] = GeneratorSettings
    """The settings this kind takes (a subclass adds a kind's own knobs)."""
    default_rank: ClassVar[int] = 4
    copy_head: ClassVar[bool] = True
    """Whether the weights channel's copy head can sit beside this kind's deltas."""
    reads_layers: ClassVar[bool] = False
    """Whether `forward` reads the sender states entering each patched layer, `cond: [N, layers,
    T, H]`, instead of the states aggregated over layers, `cond: [N, T, H]`."""
    default_targets: ClassVar[tuple[str, ...] | None] = None
    """The module kinds it patches when the recipe names none (None: every linear kind of the family)."""
    default_head_scale: ClassVar[float | None] = None
    """`head_scale` when the recipe gives none (None: 1 / d_model)."""
    kind: ClassVar[str]

    def __init__(self, spec: ReceiverSpec, config: Mapping[str, Any], sender_hidden_size: int):
        super().__init__()
        self.config = self.resolve(config)
        self.spec = spec
        self.sender_hidden_size = sender_hidden_size
        self.rank: int = self.config["rank"]
        self.alpha: float = self.config["alpha"]
        self.scale = self.alpha / self.rank
        self.detokenizer = self.head(spec)

    def head(self, spec: ReceiverSpec) -> SlotHead:
        """The head that turns refined slot tokens into each module's part: LoRA factors here."""
        return Detokenizer(spec, self.config["d_model"], self.rank, self.config["head_scale"])

    def delta(self, cond: Tensor, mask: Tensor) -> LoRADelta:
        """`forward`'s output as a delta with this generator's scale, a row per condition row."""
        return LoRADelta(self(cond, mask), self.scale)

    @classmethod
    def resolve(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in (a `None` value means the default), validated against `Settings`,
        JSON-serialisable. `rank` None resolves to `default_rank`, `head_scale` None to
        `default_head_scale` (or 1 / d_model).

        Raises:
            RecipeError: every unknown key or invalid value, as `generator.key: message`, all at once.
        """
        from tflow.config.explain import explain

        given = {k: v for k, v in config.items() if k != "kind" and v is not None}
        try:
            settings = cls.Settings.model_validate(given, strict=True)
        except ValidationError as err:
            problems = [explain({**e, "loc": ("generator", *e["loc"])}, cls.Settings) for e in err.errors()]
            known = ", ".join(["kind", *cls.Settings.model_fields])
            raise RecipeError([p.replace("unknown key", f"unknown key for kind {cls.kind!r} (known keys: {known})", 1)
                               if p.endswith("unknown key") else p for p in problems]) from None
        cfg = {"kind": cls.kind, **settings.model_dump()}
        cfg["rank"] = cfg["rank"] or cls.default_rank
        cfg["alpha"], cfg["dropout"] = float(cfg["alpha"]), float(cfg["dropout"])
        cfg["head_scale"] = float(cfg["head_scale"] or cls.default_head_scale or 1.0 / cfg["d_model"])
        return cfg

    def forward(self, cond: Tensor, mask: Tensor) -> Factors:
        """cond: [N, T, H] (padding zero; [N, layers, T, H] with `reads_layers`), mask: [N, T] bool
        -> {name: (A [N, r, in], B [N, out, r])}."""
        raise NotImplementedError
