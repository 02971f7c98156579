"""tflow.communicate: one entry point for every channel, the checks they share, one call at a time."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

from tflow.agents import Receiver, Sender
from tflow.channels.registry import Call, available, runner
from tflow.delta import LoRADelta
from tflow.errors import ChannelError, QueryError
from tflow.generation import GenerationSettings, RowStream
from tflow.reply import Reply

LATENT_CHANNELS = ("kv", "latent")

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def communicate(senders: Sequence[Sender], receiver: Receiver, query: str | Sequence[str], *,
                channel: str = "weights", max_new_tokens: int | Sequence[int] = 64, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
                message_tokens: int = 256,
                contexts: Sequence[Mapping[str, str]] | None = None,
                stream: RowStream | None = None, delta: LoRADelta | None = None, message=None,
                latent_steps: int = 10, rounds: int = 1, realign: bool = False) -> Reply | list[Reply]:
    """Answer `query` (a str -> Reply; a list -> list of Replies, run as one batch) over `channel`.

    Channels: `none` (the receiver alone), `text` (TextMAS), `weights` (TFlow), `kv` (DiffMAS:
    a shared KV trace the receiver decodes on; LatentMAS while its LoRA is untrained) and `latent`
    (RecursiveMAS: latent thoughts spliced into the receiver's prompt).

    `max_new_tokens` is the receiver's budget, one for all queries or one per query.
    `contexts`, one mapping per query (or one mapping with a single query), gives a sender (by
    name) a private document for that query in place of its own `context`. `stream` (tflow.generation.RowStream) sees the
    receiver's tokens of every query as they are decoded, and may stop single queries.
    `delta` (weights channel only), one row per query or one row for all, is applied in place of
    the generated one: neither the senders nor the generator run, and the ledger holds the
    receiver alone (ablations, a delta made earlier). `message` does the same for kv (a trace:
    per query, per layer (keys, values) [kv_heads, positions, head_dim], as
    `tflow.trace.Trace.rows_kv` gives them) and latent (the thoughts as the receiver splices them,
    [queries, vectors, hidden]), one per query.
    `latent_steps` (kv, latent) is how many latent steps each sender runs after its turn;
    `realign` (kv) maps each last-layer state into the input-embedding space with LatentMAS's
    ridge matrix before its norm is rescaled; `rounds` (latent) is the recursion rounds.

    Calls from several threads on shared models run one at a time, never mixing deltas.
    On the weights channel, a query whose generated delta is not finite or has a norm above
    `receiver.generator.max_delta_norm` is answered without its delta (`Reply.delta_applied`
    False, the reason in `Reply.warnings`); the other queries of the batch keep theirs.

    Raises:
        ChannelError: unknown channel, `weights` with a receiver that has no generator (and no
            `delta`), a `delta` on another channel, `kv` with a sender on another backbone than
            the receiver's, `latent` without trained links or on a backbone without input embeddings.
        QueryError: empty query, bad token budget, a prompt longer than the context, a `delta`
            whose rows are neither one nor one per query, latent_steps < 0, rounds < 1, or beam
            search on kv or latent.
    """
    if channel not in available():
        raise ChannelError(f"unknown channel {channel!r}; choose one of: {', '.join(available())}")
    if delta is not None and channel != "weights":
        raise ChannelError(f"a delta is the weights channel's message; the {channel} channel takes none")
    if message is not None and channel not in LATENT_CHANNELS:
        raise ChannelError(f"message is a kv trace or latent thoughts; the {channel} channel takes none"
                           + (" (give a delta)" if channel == "weights" else ""))
    if channel != "none" and not senders:
        raise ChannelError(f"the {channel} channel needs at least one sender")
    queries = [query] if isinstance(query, str) else list(query)
    if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
        raise QueryError("every query must be a non-empty string")
    if delta is not None and delta.batch_size not in (1, len(queries)):
        raise QueryError(f"the delta has {delta.batch_size} rows for {len(queries)} queries; give one row or one per query")
    if message_tokens <= 0:
        raise QueryError(f"message_tokens must be > 0, got {message_tokens}")
    if isinstance(latent_steps, bool) or not isinstance(latent_steps, int) or latent_steps < 0:
        raise QueryError(f"latent_steps must be an integer >= 0, got {latent_steps!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise QueryError(f"rounds must be an integer >= 1, got {rounds!r}")
    if channel in LATENT_CHANNELS and num_beams > 1:
        raise QueryError(f"the {channel} channel decodes on a prefilled cache and needs num_beams 1, got {num_beams}")
    if message is not None and len(message) != len(queries):
        raise QueryError(f"the message has {len(message)} rows for {len(queries)} queries; give one per query")
    budgets = _budgets(max_new_tokens, len(queries))
    settings = GenerationSettings(max(budgets), do_sample, temperature, top_p, num_beams)
    names = sender_names(senders, receiver)
    contexts = _contexts(contexts, queries, names, isinstance(query, str))
    per_sender = by_sender(contexts, names)
    call = Call(senders, receiver, queries, settings, names, per_sender,
                {"budgets": budgets if len(set(budgets)) > 1 else None, "stream": stream},
                message_tokens, delta, message, latent_steps, rounds, realign)
    run, check = runner(channel)
    if check is not None:
        check(call)
    with _exclusive([s.model for s in senders] + [receiver.model]):
        replies = run(call)
    return replies[0] if isinstance(query, str) else replies


def _contexts(contexts, queries: list[str], names: list[str], single: bool) -> list[Mapping[str, str]] | None:
    """One {sender name: document} mapping per query; a lone mapping goes with a single query.

    Raises:
        QueryError: not one mapping per query, or a mapping naming no sender of the team.
    """
    if contexts is None:
        return None
    if single and isinstance(contexts, Mapping):
        contexts = [contexts]
    if isinstance(contexts, (str, Mapping)) or len(contexts) != len(queries):
        got = "a mapping" if isinstance(contexts, Mapping) else f"{len(contexts)} contexts"
        raise QueryError(f"got {got} for {len(queries)} queries; give one mapping per query")
    contexts = [c or {} for c in contexts]
    for c in contexts:
        if not isinstance(c, Mapping):
            raise QueryError(f"a context must map a sender name to a document, got {type(c).__name__}")
        unknown = sorted(set(c) - set(names))
        if unknown:
            raise QueryError(f"contexts name {unknown}, not a sender of this team; its senders are: {', '.join(names)}")
    return contexts


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


def by_sender(contexts: Sequence[Mapping[str, str] | None] | None, names: Sequence[str]) -> list[list[str | None]] | None:
    """One mapping per query (sender name -> document) turned into `Call.contexts`: per sender, per
    query, that sender's document (None where the query gives it none)."""
    return None if contexts is None else [[(c or {}).get(name) for c in contexts] for name in names]


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
