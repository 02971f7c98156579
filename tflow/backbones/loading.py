"""Loading frozen backbones: hub id or local folder, through from_pretrained; tiny ones built on demand."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tflow.backbones import devices
from tflow.backbones import gguf as gguf_models
from tflow.config.base import looks_local
from tflow.errors import ModelLoadError, first_line


def load_backbone(section, where: str = "model", agent: str | None = None):
    """(model, tokenizer) for a recipe `model` section: frozen, eval mode, on its device.

    A GGUF `path` is dequantized once into `section.cache_dir`, and with `section.tiny` a missing
    folder is built as a tiny random model (both reported on stderr). Errors name the section as
    `where` (`senders.0.model`) and, when given, the `agent` that runs it.

    Raises:
        DeviceError: `section.device` does not exist here, or cannot compute in `section.dtype`
            (checked before anything is built or loaded).
        ModelLoadError: the path is neither a loadable folder, a readable GGUF file nor a cached
            hub id, the tokenizer has no chat template, or `section.tiny` would build its random
            model at a path shaped like a hub id (`Qwen/Qwen3-0.6B`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = devices.resolve(section.device, f"{where}.device")
    devices.check_dtype(devices.DTYPES[section.dtype], device, f"{where}.dtype {section.dtype!r}",
                        f"set {where}.dtype: float32")
    path = section.path
    if gguf_models.is_gguf(path):
        path = str(gguf_models.cached_folder(path, section.cache_dir))
    if section.tiny is not None and not Path(path).exists():
        from tflow.backbones import tiny

        if looks_like_hub_id(path):
            raise ModelLoadError(
                f"{where}.path: {path!r} looks like a hub id, but {where}.tiny builds a random model "
                f"there; give a local folder such as ./models/tiny, or set {where}.tiny=null to load the hub model"
            )
        print(f"building a tiny random {section.tiny.arch} model at {path}", file=sys.stderr)
        options = section.tiny.model_dump()
        tiny.build(path, vocab_size=options.pop("vocab_size"), seed=options.pop("seed"), **options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=devices.DTYPES[section.dtype])
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{where}.path: cannot load {path!r}{_of(agent)} ({first_line(err)}); give a local folder with config.json and "
            "weights, or a hub id already in the local cache (downloads are off)"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{where}.path: the tokenizer of {path!r}{_of(agent)} has no chat template; "
                             "use a chat/instruct model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False).eval()
    return model.to(device), tokenizer


def looks_like_hub_id(path: str) -> bool:
    """Whether `path` has the shape of a hub id, `org/name`, rather than of a local folder (`./org/name`)."""
    return not looks_local(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None


def _of(agent: str | None) -> str:
    return f" (for {agent})" if agent else ""
