"""The weights channel's recipe sections: `generator` (the hypernetwork) and `fusion`."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tflow.config.base import Section, layer_indices, show, suggest, unique_items


class GeneratorSection(Section):
    """The hypernetwork turning sender hidden states into per-query LoRA factors."""

    kind: str = "param_tokens"
    """Architecture, a kind registered in `generators`: `param_tokens` (transformer over parameter
    tokens, the paper's), `mlp`, or `basis` (the param-token trunk emitting a K x K core per module
    on a shared learned basis)."""
    rank: int | None = Field(None, gt=0)
    """LoRA rank r of each sender's delta (the fused delta has rank r × senders); for `basis`, the
    basis size K (senders' cores add, so the fused delta has rank K). null: 4, or 16 for `basis`."""
    alpha: float = Field(8.0, gt=0)
    """LoRA alpha; deltas are scaled by alpha / rank."""
    targets: list[str] | None = Field(None, min_length=1)
    """Linear module kinds of the receiver to patch in each targeted layer; null: every linear kind
    of the receiver's family (q/k/v/o/gate/up/down_proj; Phi-3's fused qkv_proj, o_proj,
    gate_up_proj, down_proj). On Phi-3 a part name targets its whole fused module (q_proj, k_proj,
    v_proj: qkv_proj; gate_proj, up_proj: gate_up_proj). Name them by hand for a model of another
    layout."""
    layers: list[int] | None = None
    """Decoder layer indices to patch; null patches every layer."""
    d_model: int = Field(256, gt=0)
    """Hidden width of the generator."""
    depth: int = Field(2, ge=1)
    """Number of generator blocks."""
    heads: int = Field(4, ge=1)
    """Attention heads in each generator block; must divide `d_model`."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the generator during training."""
    head_scale: float | None = Field(None, gt=0)
    """Multiplier on the B heads' output; null: 1 / d_model, which keeps each optimizer step's
    change of the delta near lr whatever d_model (with 1, training diverges on deep receivers)."""
    copy_head: bool = False
    """Add a copy head (`tflow.channels.weights.copy_head`): one rank per sender token on the receiver's LM head,
    keyed by the sender's state before the token and voting for that token, so the receiver can
    state a sender's exact value (a name, a number). Needs senders on the receiver's backbone
    and tokenizer; not with `basis`. It makes the delta's rank the senders' length."""
    max_delta_norm: float | None = Field(None, gt=0)
    """Largest norm of a query's delta the receiver accepts: the Frobenius norm of all its modules'
    updates together, sqrt(sum ||scale·B A||²). A query whose delta exceeds it, or is not finite
    (always refused), is answered without the delta and its reply says so; null: no bound."""

    @model_validator(mode="after")
    def _default_rank(self) -> GeneratorSection:
        if self.copy_head and self.kind == "basis":
            raise ValueError("copy_head: not available with kind basis (its deltas live on a shared basis); "
                             "use param_tokens or mlp")
        if self.rank is None:
            import generators

            self.rank = generators.get(self.kind).defaults["rank"]
        return self

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

    @field_validator("heads")
    @classmethod
    def _heads_divide_d_model(cls, heads: int, info) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % heads:
            raise ValueError(f"must divide d_model {d_model}, got {heads}")
        return heads


class FusionSection(Section):
    """How the deltas of several senders are combined."""

    gate_init: float = Field(1.0, gt=0)
    """Initial value of each sender's gate g_s, a learned positive scalar (softplus-parameterised)
    that scales its B factors before exact rank-concatenation."""


