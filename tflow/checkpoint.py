"""Checkpoints of every channel's trained part: safetensors only, with the fingerprint of the
models they were trained for, written atomically.

A train.out_dir holds the parts of the channels trained into it: `generator.safetensors`
(weights), `kv/` (kv: a peft adapter folder, adapter_config.json + adapter_model.safetensors)
and `latent.safetensors` (latent), beside the last run's recipe.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from tflow.errors import CheckpointError
from tflow.hypernetwork import Hypernetwork
from tflow.io import atomic_write_safetensors, atomic_write_text, read_safetensors
from tflow.spec import architecture

GENERATOR_FILE = "generator.safetensors"
KV_DIR = "kv"
LATENT_FILE = "latent.safetensors"
RECIPE_FILE = "recipe.yaml"
PART_FILES = {"weights": GENERATOR_FILE, "kv": f"{KV_DIR}/adapter_model.safetensors", "latent": LATENT_FILE}
KINDS = {"weights": "generator", "kv": "kv", "latent": "latent"}


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
    if hypernet.senders is not None:
        metadata["senders_fingerprint"] = json.dumps(hypernet.senders, sort_keys=True)
    path = out_dir / GENERATOR_FILE
    atomic_write_safetensors(tensors, path, metadata)
    if recipe is not None:
        atomic_write_text(out_dir / RECIPE_FILE, recipe.to_yaml())
    return path


def save_kv(lora, out_dir: str | Path, recipe=None, base_model: str | None = None) -> Path:
    """Write the kv LoRA as a peft adapter folder `out_dir/kv` (peft loads it) with tflow's metadata."""
    from tflow import __version__
    from tflow.export import ADAPTER_CONFIG, peft_config

    folder = Path(out_dir) / KV_DIR
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "tflow.kind": "kv", "tflow.version": __version__,
                "config": json.dumps(lora.config, sort_keys=True),
                "receiver_fingerprint": json.dumps(lora.spec.fingerprint(), sort_keys=True)}
    path = Path(out_dir) / PART_FILES["kv"]
    atomic_write_safetensors(lora.peft_state(), path, metadata)
    config = peft_config(base_model, lora.rank, lora.alpha, lora.spec.module_names)
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    if recipe is not None:
        atomic_write_text(Path(out_dir) / RECIPE_FILE, recipe.to_yaml())
    return path


def save_links(links, out_dir: str | Path, fingerprint: dict, recipe=None) -> Path:
    """Write the latent channel's links to `out_dir/latent.safetensors`; `fingerprint` describes the
    backbones they map between (`links_fingerprint`)."""
    from tflow import __version__

    tensors = {k: v.detach().cpu().contiguous() for k, v in links.state_dict().items()}
    metadata = {"tflow.kind": "latent", "tflow.version": __version__, "config": json.dumps(links.config, sort_keys=True),
                "receiver_fingerprint": json.dumps(fingerprint, sort_keys=True)}
    path = Path(out_dir) / LATENT_FILE
    atomic_write_safetensors(tensors, path, metadata)
    if recipe is not None:
        atomic_write_text(Path(out_dir) / RECIPE_FILE, recipe.to_yaml())
    return path


def backbone_fingerprint(model) -> dict:
    """What a trained part must match of an agent's backbone: architecture, depth, width, vocabulary."""
    config = model.config
    return {"architecture": architecture(model),
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size}


def links_fingerprint(senders, receiver) -> dict:
    """What latent links must match: every agent's architecture, width and depth."""
    def backbone(model):
        fp = backbone_fingerprint(model)
        return [fp["architecture"], fp["hidden_size"], fp["num_layers"]]

    return {"senders": [backbone(s.model) for s in senders], "receiver": backbone(receiver.model)}


def trained_parts(checkpoint: str | Path) -> dict[str, Path]:
    """{channel: file} of the trained parts a checkpoint folder holds (or of the one file given).

    Raises:
        CheckpointError: no such folder or file, a folder with no part, or a file of no known kind.
    """
    path = Path(checkpoint)
    if path.is_dir():
        found = {channel: path / name for channel, name in PART_FILES.items() if (path / name).is_file()}
        if not found:
            raise CheckpointError(f"checkpoint folder {checkpoint} has no {GENERATOR_FILE}; train one with "
                                  "`tflow train RECIPE train.out_dir=DIR` (or train.channel=kv, latent for "
                                  f"{KV_DIR}/, {LATENT_FILE})")
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass the train.out_dir of a finished run")
    kind = read_safetensors(path)[1].get("tflow.kind")
    channel = {v: k for k, v in KINDS.items()}.get(kind)
    if channel is None:
        raise CheckpointError(f"{path} is a safetensors file but not a tflow generator checkpoint")
    return {channel: path}


def require_parts(channels, checkpoint: str | Path | None) -> None:
    """Check, before any weights load, that `checkpoint` holds the trained part of every channel
    that has one; without a checkpoint only kv may run (untrained: LatentMAS).

    Raises:
        ChannelError: weights or latent without a checkpoint.
        CheckpointError: a checkpoint without one of the parts (the message names the command
            that trains it), or one that cannot be read.
    """
    from tflow.errors import ChannelError

    wanted = [c for c in channels if c in PART_FILES]
    if checkpoint is None:
        for channel in (c for c in wanted if c != "kv"):
            part = "a trained generator" if channel == "weights" else "trained links"
            raise ChannelError(f"the {channel} channel needs {part}: pass --checkpoint DIR (the train.out_dir of "
                               f"`tflow train RECIPE train.channel={channel}`), or leave {channel} out of --channels")
        return
    found = trained_parts(checkpoint)
    for channel in (c for c in wanted if c not in found):
        raise CheckpointError(f"checkpoint {checkpoint} has no {channel} part ({PART_FILES[channel]}); train it with "
                              f"`tflow train RECIPE train.channel={channel} train.out_dir={checkpoint}`")


def load_kv(lora, path: str | Path) -> None:
    """Fill the kv LoRA from its adapter file after checking receiver and LoRA shape.

    Raises:
        CheckpointError: not safetensors, another kind, another receiver or LoRA, missing tensors.
    """
    tensors = _checked(path, "kv", lora.spec.fingerprint(), lora.config)
    missing = lora.load_peft_state(tensors)
    if missing:
        raise CheckpointError(f"{path} does not fit the kv LoRA: missing or misshapen {missing[:3]}")


def load_links(links, path: str | Path, fingerprint: dict) -> None:
    """Fill latent links from their file after checking the backbones and link widths.

    Raises:
        CheckpointError: not safetensors, another kind, other backbones or links, missing tensors.
    """
    tensors = _checked(path, "latent", fingerprint, links.config)
    result = links.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit the links: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def _checked(path: str | Path, channel: str, fingerprint: dict, config: dict, fix_models: str | None = None,
             fix_config: str | None = None, senders: list[dict] | None = None) -> dict:
    """The tensors of `channel`'s part file, after its kind, fingerprint, sender backbones (when
    both the file and `senders` record them) and config are checked.

    Raises:
        CheckpointError: not safetensors, another channel's part, other models, another config.
    """
    tensors, meta = read_safetensors(path)
    kind, wanted = meta.get("tflow.kind"), KINDS[channel]
    if kind != wanted:
        if kind not in KINDS.values():
            raise CheckpointError(f"{path} is a safetensors file but not a tflow {wanted} checkpoint")
        other = {v: k for k, v in KINDS.items()}[kind]
        raise CheckpointError(f"{path} holds the {other} channel's part, not the {channel} channel's; "
                              f"train that with `tflow train RECIPE train.channel={channel}`")
    mismatch = _first_difference(json.loads(meta.get("receiver_fingerprint", "{}")), fingerprint)
    if mismatch:
        raise CheckpointError(f"{path} was trained for another receiver ({mismatch}); "
                              f"{fix_models or 'use the models it was trained with'}")
    if senders is not None and "senders_fingerprint" in meta:
        _check_senders(path, json.loads(meta["senders_fingerprint"]), senders)
    mismatch = _first_difference(json.loads(meta.get("config", "{}")), json.loads(json.dumps(config)))
    if mismatch:
        noun = "generator" if channel == "weights" else f"{channel} part"
        raise CheckpointError(f"{path} holds a different {noun} ({mismatch}); "
                              f"{fix_config or f'make the recipe {channel} section match the checkpoint recipe.yaml'}")
    return tensors


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
    tensors = _checked(path, "weights", hypernet.spec.fingerprint(), hypernet.config,
                       "use the model and generator.targets/layers it was trained with",
                       "make the recipe's generator, senders and fusion match the checkpoint's recipe.yaml",
                       hypernet.senders)
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
