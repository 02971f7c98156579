"""The kv channel's options (`communicate` keywords) and its recipe section `kv`."""

from __future__ import annotations

from pydantic import Field, field_validator

from tflow.config.base import Section, layer_indices, unique_items


class KVOptions(Section):
    """How the senders build the kv channel's trace; `communicate(..., channel="kv")` takes these."""

    latent_steps: int = Field(10, ge=0)
    """Latent steps each sender runs after prefilling its turn onto the trace: its last-layer
    state, rescaled to the mean input-embedding norm, becomes the next input embedding."""
    realign: bool = False
    """Map each last-layer state into the input-embedding space with LatentMAS's ridge matrix
    W_a = (W_out^T W_out + 1e-5 I)^-1 W_out^T W_in before the norm rescaling (about the identity
    for tied embeddings)."""


class KVSection(KVOptions):
    """The kv channel (DiffMAS; LatentMAS while untrained): senders build a shared KV trace in turn,
    the receiver decodes on it with its own LoRA."""

    rank: int = Field(8, gt=0)
    """Rank of the receiver's LoRA (trained by `tflow train RECIPE train.channel=kv`)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    targets: list[str] | None = Field(None, min_length=1)
    """Linear module kinds of the receiver the LoRA adapts in each layer; null: every linear kind
    of the receiver's family, as for `generator.targets`."""
    layers: list[int] | None = None
    """Decoder layer indices the LoRA adapts; null: every layer."""

    _unique = field_validator("targets", "layers")(unique_items)
    _layers = field_validator("layers")(layer_indices)


