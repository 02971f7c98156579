"""The latent channel's trained part: the links (InnerLinks, OuterLinks, the feedback link), built
from the recipe's `latent` section and saved as `latent.safetensors`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tflow.agents.agent import Receiver, Sender
from tflow.channels.latent.links import Links
from tflow.training.checkpoint import (
    backbone_fingerprint,
    load_state,
    read_part,
    state_tensors,
    write_part,
)

LATENT_FILE = "latent.safetensors"


def build(recipe, senders: Sequence[Sender], receiver: Receiver) -> Links:
    """Fresh latent-channel links for the recipe's `latent` section, on the receiver's device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        links = Links([s.model.config.hidden_size for s in senders], receiver.model.config.hidden_size,
                      recipe.latent.hidden).match_embeddings([s.model for s in senders], receiver.model)
    return links.to(next(receiver.model.parameters()).device)


def fingerprint(senders: Sequence[Sender], receiver: Receiver) -> dict:
    """What latent links must match: every agent's architecture, width and depth."""
    def backbone(model):
        fp = backbone_fingerprint(model)
        return [fp["architecture"], fp["hidden_size"], fp["num_layers"]]

    return {"senders": [backbone(s.model) for s in senders], "receiver": backbone(receiver.model)}


def save(links: Links, out_dir: str | Path, fingerprint: dict, recipe=None) -> Path:
    """Write the links to `out_dir/latent.safetensors`; `fingerprint` describes the backbones they
    map between (`fingerprint(senders, receiver)`)."""
    return write_part(out_dir, LATENT_FILE, "latent", state_tensors(links), links.config, fingerprint, recipe)


def load(links: Links, path: str | Path, fingerprint: dict) -> None:
    """Fill latent links from their file after checking the backbones and link widths.

    Raises:
        CheckpointError: not safetensors, another kind, other backbones or links, missing tensors.
    """
    load_state(links, read_part(path, "latent", fingerprint, links.config), path, "links")
