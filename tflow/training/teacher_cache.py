"""The teacher's cached log-probabilities: one safetensors file per split, keyed by everything
that determines its values, checked whole before any value is used.

A file holds, for each example of a split in order, the teacher's top-k log-probabilities (fp16)
and token ids (int32) at every answer token, with the example's content digest. Its metadata
holds the key (a SHA-256 over the teacher, its adapter file, the receiver's weights and
tokenizer, the agents' settings, the task, split, data settings, top_k and every example) and a
checksum of the tensors, so a file of another recipe, model, teacher or split, or a damaged one,
is refused (`read`), never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from tflow.errors import CheckpointError
from tflow.io import atomic_write_safetensors, read_safetensors

FORMAT = 1
"""Bumped whenever what the teacher reads or how it is scored changes, so older caches are rebuilt."""
KIND = "teacher-cache"
SAMPLES = 4096
"""Entries of each weight tensor that go into a model's fingerprint."""

Rows = list[tuple[Tensor, Tensor]]
"""Per example: (log-probs [answer tokens, k] fp16, ids [answer tokens, k] int32)."""


def digest(*parts) -> str:
    """SHA-256 (hex) of JSON-able `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_fingerprint(model) -> str:
    """SHA-256 (hex) over every weight tensor's name, shape, dtype and `SAMPLES` evenly strided
    entries: another checkpoint, dtype or architecture gives another fingerprint, at a cost that
    does not grow with the model."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES)].to("cpu").contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (hex) of a tokenizer's vocabulary, special tokens and chat template."""
    return digest(sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                  getattr(tokenizer, "chat_template", None))


def path_for(folder: str | Path, split: str, key: str) -> Path:
    """Where the cache of `split` under `key` lives in `folder`."""
    return Path(folder) / f"{split}-{key[:16]}.safetensors"


def write(path: Path, key: str, description: dict, digests: Sequence[str], rows: Rows) -> None:
    """Write one split's rows (in the order of `digests`) with their key and checksum."""
    tensors = _tensors(digests, rows)
    meta = {"tflow.kind": KIND, "key": key, "checksum": _checksum(tensors),
            "description": json.dumps(description, sort_keys=True)}
    atomic_write_safetensors(tensors, path, meta)


def read(path: Path, key: str, digests: Sequence[str]) -> Rows:
    """The rows of a cache file, after its kind, key, examples and checksum are checked.

    Raises:
        CheckpointError: the file is unreadable, of another kind or key, for other examples, or
            damaged (its tensors do not match their checksum or each other).
    """
    tensors, meta = read_safetensors(path)
    if meta.get("tflow.kind") != KIND:
        raise CheckpointError(f"{path} is not a tflow teacher cache")
    if meta.get("key") != key:
        raise CheckpointError(f"{path} was made for another teacher, model, recipe, task or split (key differs)")
    try:  # copies: the file's memory map would follow later writes into the same file
        logprobs, ids, offsets, examples = (tensors[k].clone() for k in ("logprobs", "ids", "offsets", "examples"))
    except KeyError as err:
        raise CheckpointError(f"{path} lacks the tensor {err}") from None
    tensors = {**tensors, "logprobs": logprobs, "ids": ids, "offsets": offsets, "examples": examples}
    if meta.get("checksum") != _checksum(tensors):
        raise CheckpointError(f"{path} is damaged: its tensors do not match their checksum")
    if examples.tolist() != [list(bytes.fromhex(d)) for d in digests]:
        raise CheckpointError(f"{path} holds other examples than this split's")
    bounds = offsets.tolist()
    if (logprobs.shape != ids.shape or len(bounds) != len(digests) + 1 or bounds[0] != 0
            or bounds[-1] != logprobs.shape[0] or any(a > b for a, b in zip(bounds, bounds[1:], strict=False))):
        raise CheckpointError(f"{path} is damaged: its tensors do not fit together")
    return [(logprobs[a:b], ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def _tensors(digests: Sequence[str], rows: Rows) -> dict[str, Tensor]:
    lengths = [len(values) for values, _ in rows]
    offsets = torch.tensor([0, *lengths], dtype=torch.int64, device="cpu").cumsum(0)
    return {"logprobs": torch.cat([v for v, _ in rows]).to(torch.float16).contiguous(),
            "ids": torch.cat([i for _, i in rows]).to(torch.int32).contiguous(),
            "offsets": offsets,
            "examples": torch.tensor([list(bytes.fromhex(d)) for d in digests], dtype=torch.uint8, device="cpu")}


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
