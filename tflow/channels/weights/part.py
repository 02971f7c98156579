"""The weights channel's trained part: the hypernetwork (generator, layer aggregation, fusion
gates), built from the recipe, saved as `generator.safetensors` and loaded after its checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import generators
from tflow.agents.agent import Receiver, Sender
from tflow.agents.encoding import backbone_groups
from tflow.backbones.families import ReceiverSpec
from tflow.channels.dispatch import sender_names
from tflow.channels.weights.copy_head import lm_head
from tflow.channels.weights.hypernetwork import Hypernetwork
from tflow.errors import CheckpointError, RecipeError
from tflow.training.checkpoint import (
    backbone_fingerprint,
    load_state,
    read_part,
    state_tensors,
    write_part,
)

GENERATOR_FILE = "generator.safetensors"


def build(recipe, senders: Sequence[Sender], receiver: Receiver) -> Hypernetwork:
    """A fresh hypernetwork for the recipe's generator, on the receiver's device: a layer
    aggregation (and, where widths differ, a projection) per sender backbone."""
    g = recipe.generator
    targets = g.targets if g.targets is not None else generators.get(g.kind).default_targets
    spec = ReceiverSpec.from_model(receiver.model, targets, g.layers)
    groups = backbone_groups(senders)
    configs = [senders[groups.index(k)].model.config for k in range(max(groups) + 1)]
    fingerprints = [{"name": name, **backbone_fingerprint(s.model)}
                    for name, s in zip(sender_names(senders, receiver), senders, strict=True)]
    hypernet = Hypernetwork(spec, g.model_dump(exclude={"targets", "layers", "max_delta_norm", "copy_head"}),
                            len(senders), [c.num_hidden_layers + 1 for c in configs], [c.hidden_size for c in configs],
                            recipe.fusion.gate_init, g.max_delta_norm, groups=groups, senders=fingerprints,
                            copy=copy_target(senders, receiver) if g.copy_head else None)
    return hypernet.to(next(receiver.model.parameters()).device)


def copy_target(senders: Sequence[Sender], receiver: Receiver) -> tuple[str, int, int]:
    """The receiver's LM head (name, in, out features) for `generator.copy_head`.

    Raises:
        RecipeError: a sender on another backbone or tokenizer than the receiver, or no LM head.
    """
    name, head = lm_head(receiver.model)
    for who, s in zip(sender_names(senders, receiver), senders, strict=True):
        if s.model is not receiver.model and s.tokenizer.get_vocab() != receiver.tokenizer.get_vocab():
            raise RecipeError([f"generator.copy_head: sender {who!r} tokenizes differently from the receiver, "
                               "so its token ids name other tokens; use one backbone or set copy_head: false"])
    return name, head.in_features, head.out_features


def save(hypernet: Hypernetwork, out_dir: str | Path, recipe=None) -> Path:
    """Write the hypernetwork's tensors (generator, aggregation, gates) and the resolved recipe.

    Frozen backbone weights are never part of it. Returns the checkpoint file's path.
    """
    extra = {} if hypernet.senders is None else {"senders_fingerprint": json.dumps(hypernet.senders, sort_keys=True)}
    return write_part(out_dir, GENERATOR_FILE, "generator", state_tensors(hypernet), hypernet.config,
                      hypernet.spec.fingerprint(), recipe, **extra)


def locate(checkpoint: str | Path) -> Path:
    """The generator file of a checkpoint folder (or the file itself).

    Raises:
        CheckpointError: the folder or file does not exist, or the folder holds no generator.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / GENERATOR_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint folder {checkpoint} has no {GENERATOR_FILE}; "
                                  "train one with `tflow train RECIPE train.out_dir=DIR`")
    elif not path.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass the train.out_dir of a finished run")
    return path


def load(hypernet: Hypernetwork, checkpoint: str | Path) -> None:
    """Fill `hypernet` from a checkpoint folder (or file) after checking it was made for this receiver.

    Raises:
        CheckpointError: no such folder or file, not safetensors, another receiver's fingerprint,
            another generator shape, or missing tensors. Never falls back to an untrained generator.
    """
    path = locate(checkpoint)
    tensors = read_part(path, "weights", hypernet.spec.fingerprint(), hypernet.config,
                        "use the model and generator.targets/layers it was trained with",
                        "make the recipe's generator, senders and fusion match the checkpoint's recipe.yaml",
                        hypernet.senders)
    load_state(hypernet, tensors, path, "generator")
