"""A receiver LoRA as a channel's trained part: the kv channel's, and the trained controls'.

Built from the recipe's `kv` section (rank, alpha, targets, layers), so every channel that trains
a receiver LoRA trains one of the same size; saved as a peft adapter folder `<folder>/` (peft loads
it) with tflow's metadata; loaded after its receiver, rank and targets are checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tflow.backbones.families import ReceiverSpec
from tflow.channels.registry import TrainedPart
from tflow.errors import CheckpointError
from tflow.io import atomic_write_text
from tflow.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_model_name, peft_config
from tflow.lora.receiver_lora import ReceiverLoRA
from tflow.training.checkpoint import read_part, write_part


def build(recipe, senders, receiver) -> ReceiverLoRA:
    """A fresh receiver LoRA (zero B: an exact no-op) of the recipe's `kv` section's size."""
    kv = recipe.kv
    lora = ReceiverLoRA(ReceiverSpec.from_model(receiver.model, kv.targets, kv.layers), kv.rank, kv.alpha, recipe.seed)
    return lora.to(next(receiver.model.parameters()).device)


def save(lora: ReceiverLoRA, out_dir: str | Path, folder: str, kind: str, recipe=None,
         base_model: str | None = None) -> Path:
    """Write the LoRA as a peft adapter folder `out_dir/<folder>` with tflow's metadata (`kind`)."""
    path = write_part(out_dir, f"{folder}/{ADAPTER_WEIGHTS}", kind, lora.peft_state(), lora.config,
                      lora.spec.fingerprint(), recipe, format="pt")
    config = peft_config(base_model, lora.rank, lora.alpha, lora.spec.module_names)
    atomic_write_text(path.parent / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return path


def load(lora: ReceiverLoRA, path: str | Path, channel: str) -> None:
    """Fill the LoRA from its adapter file after checking receiver and LoRA shape.

    Raises:
        CheckpointError: not safetensors, another kind, another receiver or LoRA, missing tensors.
    """
    tensors = read_part(path, channel, lora.spec.fingerprint(), lora.config)
    missing = lora.load_peft_state(tensors)
    if missing:
        raise CheckpointError(f"{path} does not fit the {channel} channel's LoRA: missing or misshapen {missing[:3]}")


def receiver_lora_part(channel: str, module: Callable[[], type], *, folder: str | None = None,
                       kind: str | None = None, attribute: str | None = None, noun: str | None = None,
                       untrained_label: str | None = None, trained_label: str | None = None,
                       checkpointing: bool = True, compare_untrained: bool = False,
                       turns: Callable | None = None) -> TrainedPart:
    """The TrainedPart of a channel whose part is a receiver LoRA: optional (an untrained one is the
    plain receiver), saved in `out_dir/<folder>/` (default: the channel's name)."""
    folder, kind = folder or channel, kind or f"{channel}-lora"
    return TrainedPart(
        f"{folder}/{ADAPTER_WEIGHTS}", kind, noun or f"{channel} receiver LoRA", build,
        save=lambda lora, out_dir, team: save(lora, out_dir, folder, kind, team.recipe,
                                              base_model_name(team.receiver.model)),
        load=lambda lora, path, team: load(lora, path, channel),
        module=module, attribute=attribute, optional=True, is_zero=lambda lora: lora.is_zero(),
        untrained_label=untrained_label, trained_label=trained_label, checkpointing=checkpointing,
        compare_untrained=compare_untrained, turns=turns)
