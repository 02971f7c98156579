"""tflow.communicate: one entry point for every channel, the checks they share, one call at a time."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

from pydantic import ValidationError

from tflow.agents.agent import Receiver, Sender
from tflow.agents.generation import GenerationSettings, RowStream
from tflow.channels.registry import Call, Channel
from tflow.channels.registry import get as get_channel
from tflow.errors import ChannelError, QueryError
from tflow.lora.delta import LoRADelta
from tflow.reply import Reply

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def communicate(senders: Sequence[Sender], receiver: Receiver, query: str | Sequence[str], *,
                channel: str = "weights", max_new_tokens: int | Sequence[int] = 64, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
                contexts: Sequence[Mapping[str, str]] | None = None,
                stream: RowStream | None = None, delta: LoRADelta | None = None, message=None,
                **options) -> Reply | list[Reply]:
    """Answer `query` (a str -> Reply; a list -> list of Replies, run as one batch) over `channel`.

    Channels (`tflow.channels.registry`): `none` (the receiver alone), `text` (TextMAS), `weights`
    (TFlow), `kv` (DiffMAS: a shared KV trace the receiver decodes on; LatentMAS while its LoRA is
    untrained) and `latent` (RecursiveMAS: latent thoughts spliced into the receiver's prompt).

    `max_new_tokens` is the receiver's budget, one for all queries or one per query.
    `contexts`, one mapping per query (or one mapping with a single query), gives a sender (by
    name) a private document for that query in place of its own `context`. `stream` (tflow.agents.generation.RowStream) sees the
    receiver's tokens of every query as they are decoded, and may stop single queries.
    `delta` (weights), one row per query or one row for all, is applied in place of the generated
    one: neither the senders nor the generator run, and the ledger holds the receiver alone
    (ablations, a delta made earlier). `message` does the same for kv (a trace: per query, per
    layer (keys, values) [kv_heads, positions, head_dim], as `tflow.agents.trace.Trace.rows_kv` gives
    them) and latent (the thoughts as the receiver splices them, [queries, vectors, hidden]), one
    per query.
    `options` are the channel's own (`Channel.options`): `message_tokens` (text) caps each
    sender's message; `latent_steps` (kv, latent) is how many latent steps each sender runs after
    its turn; `realign` (kv) maps each last-layer state into the input-embedding space with
    LatentMAS's ridge matrix before its norm is rescaled; `rounds` (latent) is the recursion rounds.

    Calls from several threads on shared models run one at a time, never mixing deltas.
    On the weights channel, a query whose generated delta is not finite or has a norm above
    `receiver.generator.max_delta_norm` is answered without its delta (`Reply.delta_applied`
    False, the reason in `Reply.warnings`); the other queries of the batch keep theirs.

    Raises:
        ChannelError: unknown channel, a channel without the senders or trained part it needs
            (`weights` with no generator and no `delta`, `latent` without links), a `delta` or
            `message` on a channel that takes none, `kv` with a sender on another backbone than the
            receiver's, `latent` on a backbone without input embeddings.
        QueryError: empty query, bad token budget, an option the channel does not take or out of
            its range, a prompt longer than the context, a replayed message whose rows are neither
            one (delta) nor one per query, or beam search on kv or latent.
    """
    record = get_channel(channel)
    for keyword, value in (("delta", delta), ("message", message)):
        if value is not None and keyword != record.message_keyword:
            hint = f" (give {record.message_keyword})" if record.message_keyword else ""
            raise ChannelError(f"{keyword} replays a message made earlier; the {channel} channel takes none{hint}")
    if record.needs_senders and not senders:
        raise ChannelError(f"the {channel} channel needs at least one sender")
    queries = [query] if isinstance(query, str) else list(query)
    if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
        raise QueryError("every query must be a non-empty string")
    checked = channel_options(record, options)
    budgets = _budgets(max_new_tokens, len(queries))
    settings = GenerationSettings(max(budgets), do_sample, temperature, top_p, num_beams)
    names = sender_names(senders, receiver)
    contexts = _contexts(contexts, queries, names, isinstance(query, str))
    per_sender = by_sender(contexts, names)
    call = Call(senders, receiver, queries, settings, names, per_sender,
                {"budgets": budgets if len(set(budgets)) > 1 else None, "stream": stream},
                delta if delta is not None else message, checked)
    if record.check is not None:
        record.check(call)
    with _exclusive([s.model for s in senders] + [receiver.model]):
        replies = record.run(call)
    return replies[0] if isinstance(query, str) else replies


def channel_options(record: Channel, options: Mapping) -> dict:
    """The channel's options with every default filled in, checked against `record.options`.

    Raises:
        QueryError: an option the channel does not take, or a value of the wrong type or range.
    """
    model = record.options
    known = list(model.model_fields) if model is not None else []
    unknown = [k for k in options if k not in known]
    if unknown:
        takes = f"its options: {', '.join(known)}" if known else "it takes none"
        raise QueryError(f"the {record.name} channel takes no option {unknown[0]!r}; {takes}")
    if model is None:
        return {}
    try:
        return model.model_validate(dict(options), strict=True).model_dump()
    except ValidationError as err:
        raise QueryError(_option_problem(model, err.errors()[0])) from None


def _option_problem(model, error: dict) -> str:
    """`name must be an integer >= 0, got -1`: one option's problem, as the user passed it."""
    name = str(error["loc"][0])
    field = model.model_fields[name]
    rules = [f"{sign} {getattr(m, attr)}" for m in field.metadata
             for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    kind = {int: "an integer", bool: "true or false", float: "a number"}.get(field.annotation, "")
    if field.annotation is float and not rules:
        kind = "a number"
    need = " ".join(filter(None, [kind, *rules])) or error["msg"]
    return f"{name} must be {need}, got {error.get('input')!r}"


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


def batched_calls(senders: Sequence[Sender], receiver: Receiver, queries: Sequence[str],
                  contexts: Sequence[Mapping[str, str]] | None, batch_size: int, settings: Mapping):
    """The Call of each batch of queries, as `communicate` makes it (`settings`: the channel's options),
    for code that runs a channel's stages itself (ablations collecting messages)."""
    names = sender_names(senders, receiver)
    for start in range(0, len(queries), batch_size):
        batch = list(queries[start:start + batch_size])
        per_sender = by_sender(contexts[start:start + batch_size] if contexts is not None else None, names)
        yield Call(senders, receiver, batch, GenerationSettings(), names, per_sender, options=settings)


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
