"""Batched chat generation with honest token counts, per-row budgets and a per-row token stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tflow.agents.encoding import pad_batch, token_ids
from tflow.agents.prefix import reusable
from tflow.agents.trace import Trace
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
    """Texts of one batched generation with per-row prompt and generated token counts.

    `finish_reasons` per row: "stop" when the row ended on EOS, "length" when it used its budget,
    "cancelled" when a RowStream stopped it (its text and count then end where it stopped).
    `cached_tokens` per row: prompt tokens read from a kept prefix instead of run (zeros without `reuse`).
    """

    texts: list[str]
    prompt_tokens: list[int]
    generated_tokens: list[int]
    finish_reasons: list[str]
    cached_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if self.cached_tokens is None:
            object.__setattr__(self, "cached_tokens", [0] * len(self.texts))


class RowStream(Protocol):
    """Watches a batched generate() row by row while it decodes, and may stop single rows."""

    def update(self, row: int, tokens: list[int], finish_reason: str | None) -> None:
        """Row `row` has decoded `tokens` so far (its EOS included); `finish_reason` is "stop" or
        "length" on the row's last update, None before. Called from the decoding thread."""

    def cancelled(self, row: int) -> bool:
        """Whether row `row` must stop now (its batch-mates decode on, unchanged)."""


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
             max_new_tokens: int | None = None, *, budgets: Sequence[int] | None = None,
             stream: RowStream | None = None, past: Trace | None = None, reuse: str | None = None) -> Generated:
    """Left-padded batched generate() of chat-template texts; see `generate_ids`. `reuse`: a text
    every prompt may start with (a role prefix), whose kept states the rows read instead of running it."""
    seqs = token_ids(tokenizer, prompts)
    kept = None if reuse is None else [tuple(token_ids(tokenizer, [reuse])[0])] * len(seqs)
    return generate_ids(model, tokenizer, seqs, settings, max_new_tokens, budgets=budgets, stream=stream,
                        past=past, reuse=kept)


def generate_ids(model: nn.Module, tokenizer, seqs: Sequence[Sequence[int]], settings: GenerationSettings,
                 max_new_tokens: int | None = None, *, budgets: Sequence[int] | None = None,
                 stream: RowStream | None = None, past: Trace | None = None,
                 reuse: Sequence[tuple[int, ...]] | None = None) -> Generated:
    """Left-padded batched generate(); counts stop at each row's first EOS.

    `budgets` gives each row its own token budget (at most the call's); a row that reaches it
    stops and its batch-mates decode on. `stream` sees every row's tokens as they come and may
    stop rows. Neither changes a row's tokens: a row decodes as it would alone. With `past` (a
    tflow.agents.trace.Trace of the same rows), each row's prompt is read on top of its cache, which the
    call extends in place (the trace is spent after); generate() derives positions from the full
    mask, so padding inside the cache moves none. With `reuse` (per row, the ids of a prefix its
    prompt may start with) and no `past`, each row reads the leading tokens it shares with its
    prefix from states kept per model (tflow.agents.prefix) and runs only the rest, unless the model is
    training or patched or beams are on; the same numbers, whatever the cache holds.

    Raises:
        QueryError: a prompt (after its `past`) plus its token budget exceeds the model's context,
            or budgets or a stream with beam search.
    """
    budget = max_new_tokens or settings.max_new_tokens
    rows = [budget] * len(seqs) if budgets is None else [min(b, budget) for b in budgets]
    if (budgets is not None or stream is not None) and settings.num_beams > 1:
        raise QueryError("per-query token budgets and streaming need num_beams 1")
    before = past.lengths() if past is not None else [0] * len(seqs)
    limit = context_length(model)
    need = [p + len(s) + b for p, s, b in zip(before, seqs, rows, strict=True)]
    if limit is not None and max(need) > limit:
        row = max(range(len(seqs)), key=need.__getitem__)
        held = f" after {before[row]} positions of trace" if before[row] else ""
        raise QueryError(
            f"prompt of {len(seqs[row])} tokens{held} plus {rows[row]} new tokens exceeds the model's context of "
            f"{limit}; shorten the query or lower max_new_tokens"
        )
    if reuse is not None and past is None and settings.num_beams == 1 and reusable(model):
        return _generate_after(model, tokenizer, seqs, settings, max_new_tokens, reuse, budgets=budgets, stream=stream)
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "left", device)
    mask = mask.long() if past is None else torch.cat([past.mask, mask.long()], dim=1)
    eos = _eos_ids(model, tokenizer)
    watch = _RowWatch(rows, eos, stream, ids.shape[1]) if budgets is not None or stream is not None else None
    extra = {} if watch is None else {"stopping_criteria": StoppingCriteriaList([watch]),
                                      "streamer": watch.streamer if stream is not None else None}
    if past is not None:
        extra["past_key_values"] = past.cache
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, **settings.kwargs(max(rows)), **extra)
    new = out[:, ids.shape[1]:]
    counts = [min(_through_first_eos(row, eos), b) for row, b in zip(new, rows, strict=True)]
    if stream is not None:  # a cancelled row was fed padding after its last real token
        counts = [min(n, len(t)) for n, t in zip(counts, watch.tokens, strict=True)]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new, counts, strict=True)]
    reasons = ["cancelled" if watch is not None and watch.cancelled[r] else "stop" if n and int(row[n - 1]) in eos
               else "length" for r, (row, n) in enumerate(zip(new, counts, strict=True))]
    return Generated(texts, [len(s) for s in seqs], counts, reasons)


def _generate_after(model: nn.Module, tokenizer, seqs: Sequence[Sequence[int]], settings: GenerationSettings,
                    max_new_tokens: int | None, reuse: Sequence[tuple[int, ...]], **options) -> Generated:
    """`generate_ids` of each row's rest on top of the kept states of its prefix (a left-padded Trace)."""
    trace, keep = Trace.after_prefixes(model, seqs, reuse)
    if max(keep) == 0:
        out = generate_ids(model, tokenizer, seqs, settings, max_new_tokens, **options)
    else:
        out = generate_ids(model, tokenizer, [s[k:] for s, k in zip(seqs, keep, strict=True)], settings,
                           max_new_tokens, past=trace, **options)
    return replace(out, prompt_tokens=[len(s) for s in seqs], cached_tokens=keep)


class _RowWatch(StoppingCriteria):
    """Per-row budgets and cancellation for generate(), and the streamer that feeds a RowStream.

    generate() asks the criterion after each step which rows are done (a finished row is then
    fed padding, which its batch-mates never see), and hands the step's tokens to the streamer.
    """

    def __init__(self, budgets: list[int], eos: list[int], stream: RowStream | None, prompt_width: int):
        self.budgets, self.eos, self.stream, self.prompt_width = budgets, set(eos), stream, prompt_width
        self.tokens: list[list[int]] = [[] for _ in budgets]
        self.done = [False] * len(budgets)
        self.cancelled = [False] * len(budgets)
        self.streamer = _Streamer(self) if stream is not None else None

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        steps = input_ids.shape[1] - self.prompt_width
        for r, done in enumerate(self.done):
            if not done and self.stream is not None and self.stream.cancelled(r):
                self.done[r] = self.cancelled[r] = True
        stop = [steps >= b or c for b, c in zip(self.budgets, self.cancelled, strict=True)]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    def put_step(self, step: Tensor) -> None:
        for r, token in enumerate(step.tolist()):
            if self.done[r]:
                continue
            self.tokens[r].append(token)
            reason = "stop" if token in self.eos else "length" if len(self.tokens[r]) >= self.budgets[r] else None
            self.done[r] = reason is not None
            self.stream.update(r, self.tokens[r], reason)


class _Streamer(BaseStreamer):
    """generate()'s streamer: skips the prompt it is handed first, passes each step's tokens on."""

    def __init__(self, watch: _RowWatch):
        self.watch, self.prompt_seen = watch, False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.watch.put_step(value.reshape(-1))

    def end(self) -> None:
        """Nothing to flush: every row's last update carried its finish reason."""


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _through_first_eos(row: Tensor, eos: list[int]) -> int:
    hits = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else row.shape[0]
