"""The kv channel's trained part: the receiver's LoRA, built from the recipe's `kv` section and
saved as a peft adapter folder `kv/` (peft loads it) with tflow's metadata."""

from __future__ import annotations

import json
from pathlib import Path

from tflow.backbones.families import ReceiverSpec
from tflow.channels.kv.lora import KVLoRA
from tflow.errors import CheckpointError
from tflow.io import atomic_write_text
from tflow.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config
from tflow.training.checkpoint import read_part, write_part

KV_DIR = "kv"
KV_FILE = f"{KV_DIR}/{ADAPTER_WEIGHTS}"


def build(recipe, senders, receiver) -> KVLoRA:
    """A fresh kv LoRA (zero B: the kv channel is LatentMAS) for the recipe's `kv` section."""
    kv = recipe.kv
    lora = KVLoRA(ReceiverSpec.from_model(receiver.model, kv.targets, kv.layers), kv.rank, kv.alpha, recipe.seed)
    return lora.to(next(receiver.model.parameters()).device)


def save(lora: KVLoRA, out_dir: str | Path, recipe=None, base_model: str | None = None) -> Path:
    """Write the kv LoRA as a peft adapter folder `out_dir/kv` (peft loads it) with tflow's metadata."""
    path = write_part(out_dir, KV_FILE, "kv", lora.peft_state(), lora.config, lora.spec.fingerprint(), recipe,
                      format="pt")
    config = peft_config(base_model, lora.rank, lora.alpha, lora.spec.module_names)
    atomic_write_text(path.parent / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return path


def load(lora: KVLoRA, path: str | Path) -> None:
    """Fill the kv LoRA from its adapter file after checking receiver and LoRA shape.

    Raises:
        CheckpointError: not safetensors, another kind, another receiver or LoRA, missing tensors.
    """
    tensors = read_part(path, "kv", lora.spec.fingerprint(), lora.config)
    missing = lora.load_peft_state(tensors)
    if missing:
        raise CheckpointError(f"{path} does not fit the kv LoRA: missing or misshapen {missing[:3]}")

