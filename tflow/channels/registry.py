"""The channel registry: each channel registers one `Channel` record that owns its whole lifecycle.

A record says how the channel runs a batched call and what it checks first; its options (the
`communicate` keyword arguments and the recipe sections it owns); its trained part, if any (build,
save, load, the Lightning module that trains it); what it adds to the receiver's context; which
ablations it supports and how its message is replayed; and its label in reports. `team`,
`checkpoint`, `training`, `evaluation`, `serving` and the CLI ask the registry and name no channel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from tflow.agents.agent import Receiver, Sender
    from tflow.agents.generation import GenerationSettings
    from tflow.reply import Reply


@dataclass(frozen=True)
class Call:
    """One checked `communicate` call, as every channel receives it.

    `contexts[s][q]` is sender s's private document for query q (None: its own), or None for
    none at all; `decode` holds the receiver's per-row `budgets` and `stream`; `message` is a
    message made earlier (the channel's `message_keyword`: a delta, a trace, thoughts), a row per
    query or one for all, in place of the senders' own; `options` are the channel's own options
    (`Channel.options`), every one filled in.
    """

    senders: Sequence[Sender]
    receiver: Receiver
    queries: list[str]
    settings: GenerationSettings
    names: list[str]
    contexts: list[list[str | None]] | None
    decode: Mapping = field(default_factory=dict)
    message: object | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def context(self, s: int, q: int) -> str | None:
        return self.contexts[s][q] if self.contexts is not None else None


Runner = Callable[[Call], "list[Reply]"]
Check = Callable[[Call], None]


@dataclass(frozen=True)
class TrainedPart:
    """A channel's trainable part: a torch module held by the receiver, saved as safetensors.

    `build(recipe, senders, receiver)` makes a fresh one on the receiver's device; `save(part,
    out_dir, team)` writes it atomically into a train.out_dir and returns the file; `load(part,
    path, team)` fills it from `file` after checking it fits (CheckpointError otherwise);
    `module()` is the Lightning module class that trains it (imported on use); `is_zero(part)`
    says whether a part is an exact no-op (an untrained part of an `optional` channel).
    """

    file: str
    """Its path inside a checkpoint folder; its safetensors metadata says `tflow.kind: kind`."""
    kind: str
    noun: str
    """What it is, for messages: `generator`, `kv LoRA`, `latent links`."""
    build: Callable[[Any, Sequence[Sender], Receiver], nn.Module]
    save: Callable[[nn.Module, Path, Any], Path]
    load: Callable[[nn.Module, Path, Any], None]
    module: Callable[[], type]
    attribute: str | None = None
    """The Receiver attribute holding it (`generator`, `kv_lora`, `links`); None: `receiver.parts[channel]`."""
    optional: bool = False
    """The channel runs untrained too (kv: LatentMAS); otherwise it needs a trained part."""
    is_zero: Callable[[nn.Module], bool] | None = None
    untrained_label: str | None = None
    """Its label in reports while `is_zero` (default: the channel's name): `kv (LatentMAS)`."""
    trained_label: str | None = None
    """Its label in reports once trained (default: the channel's name): `none trained`."""
    run_dir: str | None = None
    """Where a run keeps metrics.csv and its Lightning checkpoint, relative to train.out_dir
    (None: `<channel>-run`; the weights channel keeps them in train.out_dir itself)."""
    compare_untrained: bool = False
    """`tflow eval` reports its row without the part beside the trained one (the trained controls)."""
    checkpointing: bool = True
    """Whether train.gradient_checkpointing may be on (reading a KV trace forbids it)."""
    describe: Callable[[Any], str] | None = None
    """Its name in `tflow train`'s first line, from the recipe (default: `noun`)."""
    turns: Callable[[Any, list[str], list[dict[str, str]]], list[str]] | None = None
    """A control's receiver turns: (team, queries, per-query {sender: document}) -> the user turns
    its receiver reads; what the control trains on, and what a distillation teacher
    (`train.teacher`) of that channel reads."""


@dataclass(frozen=True)
class Ablations:
    """How the evaluation's ablations reach a channel's message.

    collect(call_args, batch_size, ablations) -> the channel's messages for every query (see
    `tflow.evaluation.ablations.collect`); summarize(messages, receiver) -> its diagnostics, or
    None; ablate(messages, names) -> {row: messages}, each a row per query or one row for all;
    part(messages, rows: slice) -> the messages of those queries, replayed through `communicate`
    as the channel's `message_keyword`.
    """

    names: tuple[str, ...]
    collect: Callable
    ablate: Callable
    part: Callable
    summarize: Callable | None = None
    check: Callable | None = None
    """check(team, names) raises AblationError before anything runs for rows this team cannot have."""


ContextUse = Callable[[Any, str, Mapping[str, str], int, Mapping[str, Any]], list[tuple[Any, int, int]]]
"""(team, query, contexts, max_tokens, options) -> [(agent, prompt positions, new tokens)] it runs."""


@dataclass(frozen=True)
class Channel:
    """Everything tflow knows of one channel; `register` adds it to the registry."""

    name: str
    run: Runner
    context_use: ContextUse
    check: Check | None = None
    options: type | None = None
    """A pydantic model of its `communicate` keyword options, with their defaults and limits."""
    settings: Callable[[Any], dict] | None = None
    """recipe -> the values of `options` the recipe sets (`Team.communicate`'s defaults)."""
    sections: Mapping[str, type] = field(default_factory=dict)
    """The recipe sections it owns: {key: pydantic model}, e.g. {"kv": KVSection}."""
    part: TrainedPart | None = None
    needs_senders: bool = True
    message_keyword: str | None = None
    """The `communicate` keyword that replays a message made earlier (`delta`, `message`)."""
    ablations: Ablations | None = None

    def __post_init__(self):
        missing = [f.name for f in fields(self) if f.name in ("name", "run", "context_use")
                   and not getattr(self, f.name)]
        if missing:
            raise ValueError(f"channel record {self.name or '?'!r} is missing {', '.join(missing)}")
        if self.ablations is not None and self.message_keyword is None:
            raise ValueError(f"channel {self.name!r} has ablations but no message_keyword to replay them with")

    def label(self, receiver) -> str:
        """Its name in reports: for an optional part, `untrained_label` while the part is absent or
        an exact no-op and `trained_label` once trained; otherwise the channel's name."""
        part = self.part
        if part is None or not part.optional:
            return self.name
        if self.untrained(receiver):
            return part.untrained_label or self.name
        return part.trained_label or self.name

    def untrained(self, receiver) -> bool:
        """Whether the receiver holds no trained part of this channel (none, or an exact no-op)."""
        held = trained_part(receiver, self.name) if self.part is not None else None
        return held is None or (self.part.is_zero is not None and self.part.is_zero(held))


_CHANNELS: dict[str, Channel] = {}


def register(channel: Channel) -> Channel:
    """Add `channel` to the registry (the order of registration is `available()`'s).

    Raises:
        ValueError: a channel of that name, or a recipe section of the same key, is already registered.
    """
    if channel.name in _CHANNELS:
        raise ValueError(f"channel {channel.name!r} is already registered")
    taken = {key: c.name for c in _CHANNELS.values() for key in c.sections}
    clash = [key for key in channel.sections if key in taken]
    if clash:
        raise ValueError(f"channel {channel.name!r}: recipe section {clash[0]!r} already belongs to the "
                         f"{taken[clash[0]]} channel")
    _CHANNELS[channel.name] = channel
    return channel


def unregister(name: str) -> None:
    """Remove a channel (tests that register one of their own)."""
    _CHANNELS.pop(name, None)


def available() -> tuple[str, ...]:
    """Registered channels, in registration order."""
    return tuple(_CHANNELS)


def get(name: str) -> Channel:
    """The record of channel `name`.

    Raises:
        ChannelError: no channel has that name (the message lists those that do).
    """
    from tflow.errors import ChannelError

    if name not in _CHANNELS:
        raise ChannelError(f"unknown channel {name!r}; choose one of: {', '.join(_CHANNELS)}")
    return _CHANNELS[name]


def channels() -> tuple[Channel, ...]:
    """Every registered record, in registration order."""
    return tuple(_CHANNELS.values())


def trained() -> tuple[str, ...]:
    """The channels with a trained part, in registration order."""
    return tuple(c.name for c in _CHANNELS.values() if c.part is not None)


def trained_part(receiver, channel: str):
    """The receiver's trained part of `channel` (None: it holds none)."""
    part = get(channel).part
    if part is None:
        return None
    if part.attribute is not None:
        return getattr(receiver, part.attribute, None)
    return receiver.parts.get(channel)


def set_trained_part(receiver, channel: str, module) -> None:
    """Give the receiver its part of `channel`."""
    part = get(channel).part
    if part.attribute is not None:
        setattr(receiver, part.attribute, module)
    else:
        receiver.parts[channel] = module


def check_replay(call: Call, channel: str) -> None:
    """The checks of a channel that decodes on a prefilled cache and replays a message per query.

    Raises:
        QueryError: beam search, or a replayed message without one row per query.
    """
    from tflow.errors import QueryError

    if call.settings.num_beams > 1:
        raise QueryError(f"the {channel} channel decodes on a prefilled cache and needs num_beams 1, "
                         f"got {call.settings.num_beams}")
    if call.message is not None and len(call.message) != len(call.queries):
        raise QueryError(f"the message has {len(call.message)} rows for {len(call.queries)} queries; give one per query")
