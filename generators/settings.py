"""The settings every generator kind takes (the recipe's `generator` keys beyond kind, targets,
layers, copy_head and max_delta_norm); a kind with knobs of its own subclasses them."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from tflow.config.base import Section


class GeneratorSettings(Section):
    """Shape and scale of a generator; `Generator.resolve` validates a config against its kind's."""

    rank: int | None = Field(None, gt=0)
    """LoRA rank r of each sender's delta (the fused delta has rank r × senders); for `basis`, the
    basis size K (senders' cores add, so the fused delta has rank K). null: the kind's
    `default_rank` (4, or 16 for `basis`)."""
    alpha: float = Field(8.0, gt=0)
    """LoRA alpha; deltas are scaled by alpha / rank."""
    d_model: int = Field(256, gt=0)
    """Hidden width of the generator."""
    depth: int = Field(2, ge=1)
    """Number of generator blocks."""
    heads: int = Field(4, ge=1)
    """Attention heads in each generator block; must divide `d_model`."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the generator during training."""
    head_scale: float | None = Field(None, gt=0)
    """Multiplier on the B heads' output; null: the kind's default, 1 / d_model, which keeps each
    optimizer step's change of the delta near lr whatever d_model (with 1, training diverges on
    deep receivers); for `perceiver` 1, since its per-rank B scalars (starting at 0) set B's size."""

    @model_validator(mode="after")
    def _heads_divide_d_model(self):
        # After defaults are filled: a d_model alone must still fit the default heads.
        if self.d_model % self.heads:
            raise PydanticCustomError("key_problem", "{message}",
                                      {"key": "heads", "message": f"must divide d_model {self.d_model}, got {self.heads}"})
        return self
