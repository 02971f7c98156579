"""`tflow export`: one query's fused delta as a PEFT LoRA adapter that peft and vLLM load.

The adapter holds `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
for every targeted module. The delta's scale and the fusion gates are folded into B (the gates
already are, by rank concatenation) and `lora_alpha` = r, so the adapter's own scaling is 1:
one scale for the whole adapter, as vLLM applies it. peft then computes exactly W x + B (A x).
A module whose rank differs from the rest (the copy head's LM head, rank = the senders' length)
gets its own rank and alpha in peft's `rank_pattern` and `alpha_pattern`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from tflow.channels import guard_delta
from tflow.encoding import encode
from tflow.errors import ChannelError, DeltaError
from tflow.fusion import Delta
from tflow.io import atomic_write_safetensors, atomic_write_text, writable_dir
from tflow.onehot import dense

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def query_delta(team, query: str, contexts: Mapping[str, str] | None = None) -> Delta:
    """The fused delta the weights channel patches in for `query` (one row).

    Raises:
        ChannelError: the receiver has no generator.
        DeltaError: the norm guard refuses the delta (not finite, or above max_delta_norm).
    """
    generator = team.receiver.generator
    if generator is None:
        raise ChannelError("exporting a delta needs a generator: load the team with a checkpoint")
    per_sender = [[(contexts or {}).get(s.name)] for s in team.senders]
    with torch.no_grad():
        delta, refused = guard_delta(generator(encode(team.senders, [query], per_sender)), generator.max_delta_norm)
    if refused[0] is not None:
        raise DeltaError(f"no adapter written: {refused[0].removesuffix('; answered without it')}")
    return delta.detach()


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


def export_adapter(team, query: str, out: str | Path, contexts: Mapping[str, str] | None = None) -> dict:
    """Write `query`'s fused delta to folder `out` as a PEFT LoRA adapter; returns its config (what
    adapter_config.json holds).

    Raises:
        ChannelError, DeltaError: as `query_delta`.
        OutputError: `out` cannot be written.
    """
    out = writable_dir(out)
    delta = query_delta(team, query, contexts).lora()  # a basis delta: A = U, B = V M, rank K
    ranks = {name: a.shape[1] for name, (a, _) in delta.factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    tensors = {}
    for name, (a, b) in delta.factors.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a[0].contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = (dense(b[0:1])[0] * delta.scale).contiguous()
    config = peft_config(base_model_name(team.receiver.model), rank, rank, sorted(delta.factors),
                         {name: r for name, r in ranks.items() if r != rank})
    atomic_write_safetensors(tensors, out / ADAPTER_WEIGHTS, {"format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return config
