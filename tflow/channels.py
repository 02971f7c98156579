"""tflow.communicate and its channels: one entry point for every channel, one ledger for all.

Channels: `none` (the receiver alone), `text` (TextMAS: senders write messages in turn, the
receiver reads them all), `weights` (TFlow: sender states -> generator -> fused delta -> the
receiver generates with the delta patched in). A query whose delta is not finite or exceeds the
generator's `max_delta_norm` is answered without it, and its Reply says so.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch

from tflow.agents import Receiver, Sender
from tflow.delta import LoRADelta
from tflow.encoding import encode, token_ids
from tflow.errors import ChannelError, QueryError
from tflow.generation import GenerationSettings, RowStream, generate, kv_cache_bytes
from tflow.patching import patched
from tflow.reply import AgentUsage, Reply, Usage

CHANNELS = ("none", "text", "weights")

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def communicate(senders: Sequence[Sender], receiver: Receiver, query: str | Sequence[str], *,
                channel: str = "weights", max_new_tokens: int | Sequence[int] = 64, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
                message_tokens: int = 256,
                contexts: Sequence[Mapping[str, str]] | None = None,
                stream: RowStream | None = None, delta: LoRADelta | None = None) -> Reply | list[Reply]:
    """Answer `query` (a str -> Reply; a list -> list of Replies, run as one batch) over `channel`.

    `max_new_tokens` is the receiver's budget, one for all queries or one per query.
    `contexts`, one mapping per query, gives a sender (by name) a private document for that
    query in place of its own `context`. `stream` (tflow.generation.RowStream) sees the
    receiver's tokens of every query as they are decoded, and may stop single queries.
    `delta` (weights channel only), one row per query or one row for all, is applied in place of
    the generated one: neither the senders nor the generator run, and the ledger holds the
    receiver alone (ablations, a delta made earlier).

    Calls from several threads on shared models run one at a time, never mixing deltas.
    On the weights channel, a query whose generated delta is not finite or has a norm above
    `receiver.generator.max_delta_norm` is answered without its delta (`Reply.delta_applied`
    False, the reason in `Reply.warnings`); the other queries of the batch keep theirs.

    Raises:
        ChannelError: unknown channel, `weights` with a receiver that has no generator (and no
            `delta`), or a `delta` on another channel.
        QueryError: empty query, bad token budget, a prompt longer than the context, or a `delta`
            whose rows are neither one nor one per query.
    """
    if channel not in CHANNELS:
        raise ChannelError(f"unknown channel {channel!r}; choose one of: {', '.join(CHANNELS)}")
    if delta is not None and channel != "weights":
        raise ChannelError(f"a delta is the weights channel's message; the {channel} channel takes none")
    if channel == "weights" and receiver.generator is None and delta is None:
        raise ChannelError("the weights channel needs a generator on the receiver: "
                           "use tflow.load(recipe, checkpoint=DIR) or Receiver(..., generator=...)")
    if channel != "none" and not senders:
        raise ChannelError(f"the {channel} channel needs at least one sender")
    queries = [query] if isinstance(query, str) else list(query)
    if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
        raise QueryError("every query must be a non-empty string")
    if delta is not None and delta.batch_size not in (1, len(queries)):
        raise QueryError(f"the delta has {delta.batch_size} rows for {len(queries)} queries; give one row or one per query")
    if message_tokens <= 0:
        raise QueryError(f"message_tokens must be > 0, got {message_tokens}")
    budgets = _budgets(max_new_tokens, len(queries))
    settings = GenerationSettings(max(budgets), do_sample, temperature, top_p, num_beams)
    decode = {"budgets": budgets if len(set(budgets)) > 1 else None, "stream": stream}
    names = sender_names(senders, receiver)
    if contexts is not None and len(contexts) != len(queries):
        raise QueryError(f"got {len(contexts)} contexts for {len(queries)} queries; give one mapping per query")
    per_sender = [[(c or {}).get(name) for c in contexts] for name in names] if contexts is not None else None
    with _exclusive([s.model for s in senders] + [receiver.model]):
        if channel == "weights":
            replies = _weights(senders, receiver, queries, settings, names, per_sender, decode, delta)
        else:
            run = {"none": _none, "text": _text}[channel]
            replies = run(senders, receiver, queries, settings, names, message_tokens, per_sender, decode)
    return replies[0] if isinstance(query, str) else replies


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One receiver token budget per query.

    Raises:
        QueryError: a budget that is not a positive integer, or a list of the wrong length.
    """
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n:
        raise QueryError(f"got {len(budgets)} max_new_tokens for {n} queries; give one or one per query")
    bad = [b for b in budgets if not isinstance(b, int) or isinstance(b, bool) or b <= 0]
    if bad:
        raise QueryError(f"max_new_tokens must be > 0, got {bad[0]}")
    return budgets


def _none(senders, receiver, queries, settings, names, message_tokens, contexts, decode):
    stages = _Stages(senders, receiver)
    with stages("receiver"):
        out = generate(receiver.model, receiver.tokenizer, [receiver.prompt(q) for q in queries], settings, **decode)
    return [
        Reply(text, "none", Usage({receiver.name: _usage(receiver, p, g)}), **stages.measured, finish_reason=reason)
        for text, p, g, reason in zip(out.texts, out.prompt_tokens, out.generated_tokens, out.finish_reasons,
                                      strict=True)
    ]


def _weights(senders, receiver, queries, settings, names, contexts, decode, given):
    stages = _Stages(senders, receiver)
    bound = receiver.generator.max_delta_norm if receiver.generator is not None else None
    states = None
    if given is None:
        with stages("senders"):
            states = encode(senders, queries, contexts)
        with stages("generator"), torch.no_grad():
            delta, refused = guard_delta(receiver.generator(states), bound)
    else:  # the guard judges a row shared by all queries once; patching repeats it per query
        delta, refused = guard_delta(given, bound)
        refused = refused * (len(queries) // given.batch_size)
    with stages("receiver"), patched(receiver.model, delta):
        out = generate(receiver.model, receiver.tokenizer, [receiver.prompt(q) for q in queries], settings, **decode)
    per_row_bytes = delta.num_bytes // delta.batch_size
    replies = []
    for q, text in enumerate(out.texts):
        ledger = {} if states is None else {names[s]: _usage(sender, int(states.prompt_tokens[s * len(queries) + q]), 0)
                                            for s, sender in enumerate(senders)}
        ledger[receiver.name] = _usage(receiver, out.prompt_tokens[q], out.generated_tokens[q])
        replies.append(Reply(text, "weights", Usage(ledger), message_bytes=per_row_bytes, **stages.measured,
                             delta_applied=refused[q] is None, warnings=[refused[q]] if refused[q] else [],
                             finish_reason=out.finish_reasons[q]))
    return replies


def guard_delta(delta: LoRADelta, max_norm: float | None) -> tuple[LoRADelta, list[str | None]]:
    """`delta` with the rows that must not be applied zeroed, and per row why (None: applied).

    A row is refused when its norm (`LoRADelta.row_norms`) is NaN or inf, or above `max_norm`.
    """
    norms = delta.row_norms()
    reasons: list[str | None] = []
    for norm in norms.tolist():
        if not math.isfinite(norm):
            reasons.append("the generated delta is not finite (NaN or inf); answered without it")
        elif max_norm is not None and norm > max_norm:
            reasons.append(f"the generated delta's norm {norm:.4g} exceeds generator.max_delta_norm "
                           f"{max_norm:g}; answered without it")
        else:
            reasons.append(None)
    refused = [r is not None for r in reasons]
    if any(refused):
        delta = delta.zero_rows(torch.tensor(refused, device=norms.device))
    return delta, reasons


def _text(senders, receiver, queries, settings, names, message_tokens, contexts, decode):
    stages = _Stages(senders, receiver)
    messages: list[dict[str, str]] = [{} for _ in queries]
    ledgers: list[dict[str, AgentUsage]] = [{} for _ in queries]
    with stages("senders"):
        for s, sender in enumerate(senders):
            prompts = [sender.prompt(text_turn(q, m), contexts[s][i] if contexts else None)
                       for i, (q, m) in enumerate(zip(queries, messages, strict=True))]
            out = generate(sender.model, sender.tokenizer, prompts, settings, max_new_tokens=message_tokens)
            for q, text in enumerate(out.texts):
                messages[q][names[s]] = text
                ledgers[q][names[s]] = _usage(sender, out.prompt_tokens[q], out.generated_tokens[q])
    with stages("receiver"):
        prompts = [receiver.prompt(text_turn(q, m)) for q, m in zip(queries, messages, strict=True)]
        out = generate(receiver.model, receiver.tokenizer, prompts, settings, **decode)
    replies = []
    for q, text in enumerate(out.texts):
        ledgers[q][receiver.name] = _usage(receiver, out.prompt_tokens[q], out.generated_tokens[q])
        sent = sum(len(ids) for ids in token_ids(receiver.tokenizer, list(messages[q].values())))
        nbytes = sent * _token_id_bytes(receiver.tokenizer)
        replies.append(Reply(text, "text", Usage(ledgers[q]), message_bytes=nbytes, messages=dict(messages[q]),
                             **stages.measured, finish_reason=out.finish_reasons[q]))
    return replies


def _usage(agent: Sender | Receiver, prompt_tokens: int, generated_tokens: int) -> AgentUsage:
    """One agent's ledger entry, its KV-cache bytes computed from its model's config."""
    cache = kv_cache_bytes(agent.model, prompt_tokens + generated_tokens)
    return AgentUsage(prompt_tokens, generated_tokens, cache)


def text_turn(query: str, messages: dict[str, str]) -> str:
    """The user turn of the text channel: the query, then each earlier message under its author."""
    if not messages:
        return query
    notes = "\n".join(f"[{name}]: {text}" for name, text in messages.items())
    return f"{query}\n\nMessages from your team:\n{notes}"


def _token_id_bytes(tokenizer) -> int:
    """Bytes per token id on the wire: the smallest integer width that holds the vocabulary."""
    return 2 if len(tokenizer) <= 1 << 16 else 4


def sender_names(senders: Sequence[Sender], receiver: Receiver) -> list[str]:
    """Every sender's name (an unnamed one is `sender{i}`), checked unique among all agents.

    Raises:
        ChannelError: two agents share a name.
    """
    names = [s.name or f"sender{i}" for i, s in enumerate(senders)]
    if len(set(names + [receiver.name])) != len(names) + 1:
        raise ChannelError(f"agent names must be unique, got senders {names} and receiver {receiver.name!r}")
    return names


@contextmanager
def _exclusive(models):
    """Hold every distinct model's lock (in a fixed order, so threads cannot deadlock)."""
    unique = {id(m): m for m in models}
    with ExitStack() as stack:
        for key in sorted(unique):
            with _LOCKS_GUARD:
                lock = _LOCKS.setdefault(unique[key], threading.Lock())
            stack.enter_context(lock)
        yield


class _Stages:
    """Per-stage wall seconds and peak CUDA memory of one call, as `with stages("receiver"): ...`.

    Waits for queued CUDA work at both ends, so a stage is charged its own kernels; memory is the
    peak allocated above the stage's start, summed over the agents' CUDA devices (None without any).
    Each stage resets those devices' peak statistics (torch.cuda.reset_peak_memory_stats).
    """

    def __init__(self, senders: Sequence[Sender], receiver: Receiver):
        devices = {next(agent.model.parameters()).device for agent in [*senders, receiver]}
        self._cuda = sorted((d for d in devices if d.type == "cuda"), key=str)
        self.seconds: dict[str, float] = {}
        self.peak_memory_bytes: dict[str, int | None] = {}

    @property
    def measured(self) -> dict:
        """The Reply fields this recorder fills."""
        return {"timings": self.seconds, "peak_memory_bytes": self.peak_memory_bytes}

    @contextmanager
    def __call__(self, stage: str):
        for device in self._cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = {device: torch.cuda.memory_allocated(device) for device in self._cuda}
        began = time.perf_counter()
        yield
        for device in self._cuda:
            torch.cuda.synchronize(device)
        self.seconds[stage] = time.perf_counter() - began
        peaks = [torch.cuda.max_memory_allocated(device) - start[device] for device in self._cuda]
        self.peak_memory_bytes[stage] = sum(peaks) if peaks else None
