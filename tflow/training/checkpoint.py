"""Checkpoints of every channel's trained part: safetensors only, with the fingerprint of the
models they were trained for, written atomically.

A train.out_dir holds the parts of the channels trained into it, each at its channel's
`TrainedPart.file` (`generator.safetensors`, `kv/adapter_model.safetensors`,
`latent.safetensors`), beside the last run's recipe.yaml. The channels write and read their
parts through `write_part` and `read_part`, which check kind, receiver, senders and config.
"""

from __future__ import annotations

import json
from pathlib import Path

from tflow.backbones.families import architecture
from tflow.errors import ChannelError, CheckpointError
from tflow.io import atomic_write_safetensors, atomic_write_text, read_safetensors

RECIPE_FILE = "recipe.yaml"


def write_part(out_dir: str | Path, file: str, kind: str, tensors: dict, config: dict, fingerprint: dict,
               recipe=None, **metadata: str) -> Path:
    """Write a part's tensors to `out_dir/file` with tflow's metadata (kind, version, config,
    receiver fingerprint), and the resolved recipe to `out_dir/recipe.yaml`; returns the file."""
    from tflow import __version__

    path = Path(out_dir) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tflow.kind": kind, "tflow.version": __version__, "config": json.dumps(config, sort_keys=True),
            "receiver_fingerprint": json.dumps(fingerprint, sort_keys=True), **metadata}
    atomic_write_safetensors(tensors, path, meta)
    if recipe is not None:
        atomic_write_text(Path(out_dir) / RECIPE_FILE, recipe.to_yaml())
    return path


def state_tensors(module) -> dict:
    """A module's state_dict, detached, contiguous and on the CPU (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def backbone_fingerprint(model) -> dict:
    """What a trained part must match of an agent's backbone: architecture, depth, width, vocabulary."""
    config = model.config
    return {"architecture": architecture(model),
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size}


def trained_parts(checkpoint: str | Path) -> dict[str, Path]:
    """{channel: file} of the trained parts a checkpoint folder holds (or of the one file given).

    Raises:
        CheckpointError: no such folder or file, a folder with no part, or a file of no known kind.
    """
    from tflow.channels import registry

    parts = {c.name: c.part for c in registry.channels() if c.part is not None}
    path = Path(checkpoint)
    if path.is_dir():
        found = {channel: path / part.file for channel, part in parts.items() if (path / part.file).is_file()}
        if not found:
            files = ", ".join(f"{p.file} ({c})" for c, p in parts.items())
            raise CheckpointError(f"checkpoint folder {checkpoint} holds no trained part ({files}); train one with "
                                  "`tflow train RECIPE train.out_dir=DIR` (train.channel=NAME for another channel's)")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass the train.out_dir of a finished run")
    kind = read_safetensors(path)[1].get("tflow.kind")
    channel = next((c for c, p in parts.items() if p.kind == kind), None)
    if channel is None:
        raise CheckpointError(f"{path} is a safetensors file but not a tflow checkpoint of any channel's part")
    return {channel: path}


def require_parts(channels, checkpoint: str | Path | None) -> None:
    """Check, before any weights load, that `checkpoint` holds the trained part of every channel
    that needs one (a channel whose part is optional, kv, runs untrained as well).

    Raises:
        ChannelError: such a channel without a checkpoint.
        CheckpointError: a checkpoint without one of the parts (the message names the command
            that trains it), or one that cannot be read.
    """
    from tflow.channels import registry

    wanted = [c for c in channels if (part := registry.get(c).part) is not None and not part.optional]
    if checkpoint is None:
        for channel in wanted:
            noun = registry.get(channel).part.noun
            raise ChannelError(f"the {channel} channel needs a checkpoint with its {noun}: pass --checkpoint DIR (the "
                               f"train.out_dir of `tflow train RECIPE train.channel={channel}`), or leave "
                               f"{channel} out of --channels")
        return
    found = trained_parts(checkpoint)
    for channel in (c for c in wanted if c not in found):
        raise CheckpointError(f"checkpoint {checkpoint} has no {channel} part ({registry.get(channel).part.file}); "
                              f"train it with `tflow train RECIPE train.channel={channel} train.out_dir={checkpoint}`")


def read_part(path: str | Path, channel: str, fingerprint: dict, config: dict, fix_models: str | None = None,
              fix_config: str | None = None, senders: list[dict] | None = None) -> dict:
    """The tensors of `channel`'s part file, after its kind, fingerprint, sender backbones (when
    both the file and `senders` record them) and config are checked.

    Raises:
        CheckpointError: not safetensors, another channel's part, other models, another config.
    """
    from tflow.channels import registry

    kinds = {c.part.kind: c.name for c in registry.channels() if c.part is not None}
    tensors, meta = read_safetensors(path)
    kind, wanted = meta.get("tflow.kind"), registry.get(channel).part.kind
    if kind != wanted:
        if kind not in kinds:
            raise CheckpointError(f"{path} is a safetensors file but not a tflow {wanted} checkpoint")
        raise CheckpointError(f"{path} holds the {kinds[kind]} channel's part, not the {channel} channel's; "
                              f"train that with `tflow train RECIPE train.channel={channel}`")
    mismatch = _first_difference(json.loads(meta.get("receiver_fingerprint", "{}")), fingerprint)
    if mismatch:
        raise CheckpointError(f"{path} was trained for another receiver ({mismatch}); "
                              f"{fix_models or 'use the models it was trained with'}")
    if senders is not None and "senders_fingerprint" in meta:
        _check_senders(path, json.loads(meta["senders_fingerprint"]), senders)
    mismatch = _first_difference(json.loads(meta.get("config", "{}")), json.loads(json.dumps(config)))
    if mismatch:
        noun = "generator" if kind == "generator" else f"{channel} part"
        raise CheckpointError(f"{path} holds a different {noun} ({mismatch}); "
                              f"{fix_config or f'make the recipe {channel} section match the checkpoint recipe.yaml'}")
    return tensors


def load_state(module, tensors: dict, path, what: str) -> None:
    """Fill `module` from `tensors`, every key matched.

    Raises:
        CheckpointError: missing or unexpected tensors.
    """
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit the {what}: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def _check_senders(path, saved: list[dict], current: list[dict]) -> None:
    """Raises CheckpointError naming the first sender whose backbone differs from the one trained with."""
    if len(saved) != len(current):
        raise CheckpointError(f"{path} was trained with {len(saved)} senders, this team has {len(current)}; "
                              "use the senders it was trained with")

    def shown(fp):
        return (f"{fp.get('architecture')} ({fp.get('num_layers')} layers, hidden {fp.get('hidden_size')}, "
                f"vocabulary {fp.get('vocab_size')})")

    for was, now in zip(saved, current, strict=True):
        if {k: v for k, v in was.items() if k != "name"} != {k: v for k, v in now.items() if k != "name"}:
            raise CheckpointError(f"{path} was trained with sender {was.get('name')!r} on {shown(was)}, but this "
                                  f"team's sender {now.get('name')!r} runs {shown(now)}; give it the model it was "
                                  "trained with")


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
