"""The weights channel's recipe sections: `generator` (the hypernetwork) and `fusion`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from generators.settings import GeneratorSettings
from tflow.config.base import Section, layer_indices, show, suggest, unique_items
from tflow.config.explain import explain


class GeneratorSection(GeneratorSettings):
    """The hypernetwork turning sender hidden states into per-query LoRA factors."""

    model_config = ConfigDict(extra="allow")  # a kind's own settings, checked against it below

    kind: str = "param_tokens"
    """Architecture, a kind registered in `generators`: `param_tokens` (transformer over parameter
    tokens, the paper's), `mlp`, `basis` (the param-token trunk emitting a K x K core per module
    on a shared learned basis), or `perceiver` (Doc-to-LoRA's: a shared Perceiver over the sender
    states entering each patched layer, one latent per rank, per-layer heads). Its settings are
    `generators.get(kind).Settings`."""
    targets: list[str] | None = Field(None, min_length=1)
    """Linear module kinds of the receiver to patch in each targeted layer; null: the kind's own
    default (`perceiver`: down_proj), else every linear kind
    of the receiver's family (q/k/v/o/gate/up/down_proj; Phi-3's fused qkv_proj, o_proj,
    gate_up_proj, down_proj). On Phi-3 a part name targets its whole fused module (q_proj, k_proj,
    v_proj: qkv_proj; gate_proj, up_proj: gate_up_proj). Name them by hand for a model of another
    layout."""
    layers: list[int] | None = None
    """Decoder layer indices to patch; null patches every layer."""
    copy_head: bool = False
    """Add a copy head (`tflow.channels.weights.copy_head`): one rank per sender token on the receiver's LM head,
    keyed by the sender's state before the token and voting for that token, so the receiver can
    state a sender's exact value (a name, a number). Needs senders on the receiver's backbone
    and tokenizer, and a kind whose deltas can sit beside it (not `basis`). It makes the delta's
    rank the senders' length."""
    max_delta_norm: float | None = Field(None, gt=0)
    """Largest norm of a query's delta the receiver accepts: the Frobenius norm of all its modules'
    updates together, sqrt(sum ||scale·B A||²). A query whose delta exceeds it, or is not finite
    (always refused), is answered without the delta and its reply says so; null: no bound."""

    _unique = field_validator("targets", "layers")(unique_items)
    _layers = field_validator("layers")(layer_indices)

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        import generators

        if kind not in generators.available():
            known = generators.available()
            raise ValueError(f"must be one of {', '.join(known)}, got {show(kind)}{suggest(kind, known)}")
        return kind

    @model_validator(mode="after")
    def _fits_its_kind(self) -> GeneratorSection:
        import generators

        kind = generators.get(self.kind)
        if self.copy_head and not kind.copy_head:
            raise ValueError(f"copy_head: not available with kind {self.kind} (its deltas cannot sit beside it); "
                             f"use {' or '.join(k for k in generators.available() if generators.get(k).copy_head)}")
        values = {k: v for k, v in self.model_dump().items() if k in GeneratorSettings.model_fields or
                  k in (self.model_extra or {})}
        try:
            kind.Settings.model_validate(values)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(map(str, e["loc"]))
            known = [*type(self).model_fields, *kind.Settings.model_fields]
            message = (f"unknown key{suggest(key, known) or f' for kind {self.kind!r}'}" if e["type"] == "extra_forbidden"
                       else explain(e, kind.Settings).removeprefix(f"{key}: "))
            raise PydanticCustomError("key_problem", "{message}", {"key": key, "message": message}) from None
        if self.rank is None:
            self.rank = kind.default_rank
        return self


class FusionSection(Section):
    """How the deltas of several senders are combined."""

    gate_init: float = Field(1.0, gt=0)
    """Initial value of each sender's gate g_s, a learned positive scalar (softplus-parameterised)
    that scales its B factors before exact rank-concatenation."""


