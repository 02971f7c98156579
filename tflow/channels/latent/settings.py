"""The latent channel's options (`communicate` keywords) and its recipe section `latent`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tflow.config.base import Section


class LatentOptions(Section):
    """How the latent channel's thoughts are rolled out; `communicate(..., channel="latent")` takes these."""

    latent_steps: int = Field(16, ge=0)
    """Latent thoughts each sender rolls out: its last-layer state through its InnerLink, fed
    back as the next input embedding."""
    rounds: int = Field(1, ge=1)
    """Recursion rounds: after each but the last, the receiver's own latent thoughts go back to
    the first sender through the feedback OuterLink."""


class LatentSection(LatentOptions):
    """The latent channel (RecursiveMAS): latent thoughts through trained links, spliced into the
    receiver's prompt."""

    hidden: int | None = Field(None, gt=0)
    """Hidden width of every link's MLP; null: the width of the link's input."""
    inner_weight: float = Field(1.0, ge=0)
    """Weight of the InnerLinks' loss, (1 - cos) + 0.1 MSE against the next token's embedding,
    beside the receiver's cross-entropy that trains the OuterLinks."""
    inner_text: Literal["prompt", "answer"] = "prompt"
    """The text an InnerLink learns on: `prompt`, each position of the sender's own prompt
    (RecursiveMAS's next-embedding objective on text); `answer`, the sender's prompt continued by
    the gold answer, from the prompt's last position on: the regime a rollout runs in, where thought
    t stands in for the t-th token the sender would say."""


