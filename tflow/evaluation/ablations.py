"""Ablations: does a channel's message carry each query's information?

An accuracy above the none channel does not show that each query's message carries that query's
information: a channel can learn one static message that helps every query. Ablation rows answer
every query with an edited message and compare:

- `shuffled`: query i gets query order[i]'s message (`derangement`, a fixed n-cycle);
- `static`: every query gets one mean message;
- `drop-sender`: one row per sender, that sender's share of the message removed;
- `scale`: the message scaled by 0.5 and by 2 (a delta's size);
- `copy-head`, `trunk`: a weights delta with a copy head split into the copy head's part alone and
  the generator trunk's part alone (the other removed).

Each channel with a trained part lists the ones it runs in its record (`Channel.ablations`) and
says how its messages are collected, edited and replayed; `tflow eval --ablations` runs them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tflow.errors import AblationError

ABLATIONS = ("shuffled", "static", "drop-sender", "scale", "copy-head", "trunk")


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation of range(n) that moves every index (Sattolo's algorithm: one n-cycle).

    Raises:
        AblationError: n < 2 (one query has no other query's delta to take).
    """
    if n < 2:
        raise AblationError(f"shuffled needs at least 2 queries to swap deltas between, got {n}")
    order = list(range(n))
    rng = random.Random(f"derangement-{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i, never i itself: that is what keeps every index moving
        order[i], order[j] = order[j], order[i]
    return order


def check_ablations(names: Sequence[str], senders: Sequence[str]) -> None:
    """Check ablation names against `ABLATIONS` and the team's senders.

    Raises:
        AblationError: an unknown name or drop-sender with fewer than two senders; the message
            lists what this team can run.
    """
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise AblationError(f"unknown ablation(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(ABLATIONS)}")
    if "drop-sender" in names and len(senders) < 2:
        possible = ", ".join(n for n in ABLATIONS if n != "drop-sender")
        raise AblationError(f"drop-sender needs two or more senders, and this team has one ({', '.join(senders)}); "
                            f"possible here: {possible}")


def parse_ablations(spec: str | Sequence[str] | None, channels: Sequence[str], senders: Sequence[str]) -> list[str]:
    """Ablation names from `"shuffled,static"` or a list, checked against the channels to evaluate.

    Raises:
        AblationError: as `check_ablations`, or ablations with no channel that has a trained part
            (the message names the channels given).
    """
    from tflow.channels import registry

    if spec is None:
        return []
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    names = list(dict.fromkeys(n for n in names if n))
    check_ablations(names, senders)
    ablatable = {c.name: c.ablations.names for c in registry.channels() if c.ablations is not None}
    if names and not any(c in ablatable for c in channels):
        untrained = ", ".join(channels)
        raise AblationError(f"channel(s) {untrained} have no message to ablate; ablations run on: "
                            f"{', '.join(ablatable)} (add it to the channels)")
    runnable = {n for c in channels if c in ablatable for n in ablatable[c]}
    alone = [n for n in names if n not in runnable]
    if alone:
        where = {n: [c for c, ns in ablatable.items() if n in ns] for n in alone}
        runs = "; ".join(f"{n} runs on {', '.join(cs) or 'no channel'}" for n, cs in where.items())
        raise AblationError(f"ablation(s) {', '.join(alone)} run on none of the channels {', '.join(channels)}; {runs}")
    return names


def rows_of(messages, rows: slice):
    """The messages of the queries in `rows` (a list or a tensor, a row per query)."""
    return messages[rows]
