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
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from tflow.agents.encoding import encode
from tflow.channels.weights.fusion import Delta
from tflow.channels.weights.run import guard_delta
from tflow.errors import ChannelError, DeltaError
from tflow.io import atomic_write_safetensors, atomic_write_text, writable_dir
from tflow.lora.onehot import dense
from tflow.lora.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    KEY_PREFIX,
    base_model_name,
    peft_config,
)


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
