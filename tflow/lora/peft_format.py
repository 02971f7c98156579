"""The PEFT LoRA adapter format: file names, key layout and adapter_config.json.

Keys are `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; peft
computes exactly W x + (lora_alpha / r) B (A x) from them. The weights channel exports a query's
delta in it (`tflow export`), the kv channel saves its LoRA as such a folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def base_model_name(model) -> str | None:
    """What peft's `base_model_name_or_path` records for `model` (None when it has no name)."""
    return getattr(model.config, "name_or_path", None) or None


def tied_to_embeddings(model, modules) -> list[str]:
    """Those of `modules` whose weight is the model's input-embedding table (tied embeddings, the
    LM head of SmolLM2). An adapter there computes the delta exactly while it stays unmerged;
    merging it would write the update into the embeddings too, which the patched receiver never
    changes. peft warns about such a target (peft issue 2777); its `ensure_weight_tying` would
    give the embeddings an adapter of their own, also unlike the patched receiver, so it is off."""
    table = model.get_input_embeddings().weight
    found = dict(model.named_modules())
    return [name for name in modules if getattr(found.get(name), "weight", None) is table]


def peft_config(base_model: str | None, rank: int, alpha: float, modules, others: Mapping[str, int] | None = None
                ) -> dict:
    """peft's adapter_config.json of a LoRA of `rank` and `alpha` on `modules` (full names); the
    modules in `others` have their own rank there, with alpha equal to it."""
    patterns = {re.escape(name): r for name, r in (others or {}).items()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(modules),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
    }
