"""Generator checkpoints: safetensors only, with the receiver's fingerprint, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from tflow.errors import CheckpointError
from tflow.hypernetwork import Hypernetwork
from tflow.io import atomic_write_safetensors, atomic_write_text, read_safetensors

GENERATOR_FILE = "generator.safetensors"
RECIPE_FILE = "recipe.yaml"


def save(hypernet: Hypernetwork, out_dir: str | Path, recipe=None) -> Path:
    """Write the hypernetwork's tensors (generator, aggregation, gates) and the resolved recipe.

    Frozen backbone weights are never part of it. Returns the checkpoint file's path.
    """
    from tflow import __version__

    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in hypernet.state_dict().items()}
    metadata = {
        "tflow.kind": "generator",
        "tflow.version": __version__,
        "config": json.dumps(hypernet.config, sort_keys=True),
        "receiver_fingerprint": json.dumps(hypernet.spec.fingerprint(), sort_keys=True),
    }
    path = out_dir / GENERATOR_FILE
    atomic_write_safetensors(tensors, path, metadata)
    if recipe is not None:
        atomic_write_text(out_dir / RECIPE_FILE, recipe.to_yaml())
    return path


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


def load_into(hypernet: Hypernetwork, checkpoint: str | Path) -> None:
    """Fill `hypernet` from a checkpoint folder (or file) after checking it was made for this receiver.

    Raises:
        CheckpointError: no such folder or file, not safetensors, another receiver's fingerprint,
            another generator shape, or missing tensors. Never falls back to an untrained generator.
    """
    path = locate(checkpoint)
    tensors, meta = read_safetensors(path)
    if meta.get("tflow.kind") != "generator":
        raise CheckpointError(f"{path} is a safetensors file but not a tflow generator checkpoint")
    saved = json.loads(meta.get("receiver_fingerprint", "{}"))
    mismatch = _first_difference(saved, hypernet.spec.fingerprint())
    if mismatch:
        raise CheckpointError(f"{path} was trained for another receiver ({mismatch}); "
                              "use the model and generator.targets/layers it was trained with")
    config = json.loads(meta.get("config", "{}"))
    mismatch = _first_difference(config, json.loads(json.dumps(hypernet.config)))
    if mismatch:
        raise CheckpointError(f"{path} holds a different generator ({mismatch}); "
                              "make the recipe's generator, senders and fusion match the checkpoint's recipe.yaml")
    result = hypernet.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit the generator: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def _first_difference(saved, current, where: str = "") -> str | None:
    """A short description of the first place two JSON-like values differ, or None."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _first_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    if saved != current:
        return f"{where}: checkpoint has {_show(saved)}, this receiver has {_show(current)}"
    return None


def _show(value) -> str:
    return f"{len(value)} entries" if isinstance(value, list) else repr(value)
