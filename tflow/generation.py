"""Batched chat generation with honest token counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tflow.encoding import pad_batch, token_ids
from tflow.errors import QueryError


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every channel, so that comparisons are like for like."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise QueryError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise QueryError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise QueryError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def kwargs(self, max_new_tokens: int | None = None) -> dict:
        out = {"max_new_tokens": max_new_tokens or self.max_new_tokens, "do_sample": self.do_sample,
               "num_beams": self.num_beams}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        return out


@dataclass(frozen=True)
class Generated:
    """Texts of one batched generation with per-row prompt and generated token counts."""

    texts: list[str]
    prompt_tokens: list[int]
    generated_tokens: list[int]


def context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def kv_cache_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes the keys and values of `tokens` positions take in `model`'s cache, from its config.

    2 (K and V) * layers * kv_heads * head_dim * bytes per element of the model's dtype * tokens.
    """
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize * tokens


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
             max_new_tokens: int | None = None) -> Generated:
    """Left-padded batched generate(); counts stop at each row's first EOS.

    Raises:
        QueryError: a prompt plus the token budget exceeds the model's context.
    """
    budget = max_new_tokens or settings.max_new_tokens
    seqs = token_ids(tokenizer, prompts)
    limit = context_length(model)
    longest = max(len(s) for s in seqs)
    if limit is not None and longest + budget > limit:
        raise QueryError(
            f"prompt of {longest} tokens plus {budget} new tokens exceeds the model's context of {limit}; "
            "shorten the query or lower max_new_tokens"
        )
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "left", device)
    eos = _eos_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask.long(), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, **settings.kwargs(budget))
    new = out[:, ids.shape[1]:]
    counts = [_through_first_eos(row, eos) for row in new]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new, counts, strict=True)]
    return Generated(texts, [len(s) for s in seqs], counts)


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _through_first_eos(row: Tensor, eos: list[int]) -> int:
    hits = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else row.shape[0]
