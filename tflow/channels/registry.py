"""The channel registry: each channel module registers the function that runs one batched call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tflow.agents import Receiver, Sender
from tflow.delta import LoRADelta
from tflow.generation import GenerationSettings
from tflow.reply import Reply


@dataclass(frozen=True)
class Call:
    """One checked `communicate` call, as every channel receives it.

    `contexts[s][q]` is sender s's private document for query q (None: its own), or None for
    none at all; `decode` holds the receiver's per-row `budgets` and `stream`; `message` (kv,
    latent) is a message made earlier, a row per query, in place of the senders' own.
    """

    senders: Sequence[Sender]
    receiver: Receiver
    queries: list[str]
    settings: GenerationSettings
    names: list[str]
    contexts: list[list[str | None]] | None
    decode: Mapping = field(default_factory=dict)
    message_tokens: int = 256
    delta: LoRADelta | None = None
    message: object | None = None
    latent_steps: int = 10
    rounds: int = 1
    realign: bool = False

    def context(self, s: int, q: int) -> str | None:
        return self.contexts[s][q] if self.contexts is not None else None


Runner = Callable[[Call], list[Reply]]
Check = Callable[[Call], None]
_RUNNERS: dict[str, tuple[Runner, Check | None]] = {}


def register(name: str, check: Check | None = None) -> Callable[[Runner], Runner]:
    """Function decorator: make `name` a channel that `communicate` runs with this function.

    `check(call)`, when given, runs before anything is computed and raises a TflowError for a
    call the channel cannot run (a missing trained part, agents that cannot share its message).

    Raises:
        ValueError: `name` is already registered.
    """

    def decorate(run: Runner) -> Runner:
        if name in _RUNNERS:
            raise ValueError(f"channel {name!r} is already registered by {_RUNNERS[name][0].__module__}")
        _RUNNERS[name] = (run, check)
        return run

    return decorate


def available() -> tuple[str, ...]:
    """Registered channels, in registration order."""
    return tuple(_RUNNERS)


def runner(name: str) -> tuple[Runner, Check | None]:
    """The channel's run function and its check (None: it can run any checked call)."""
    return _RUNNERS[name]
