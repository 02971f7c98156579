"""Evaluation: every channel over one task's examples, under one harness and one cost ledger."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from tflow.channels import registry
from tflow.errors import AblationError, ChannelError, DataError, QueryError
from tflow.evaluation.ablations import derangement, parse_ablations
from tflow.reply import Reply
from tflow.tasks import Example, Task
from tflow.team import Team, channel_settings

STAGES = ("senders", "generator", "receiver")


@dataclass(frozen=True)
class Prediction:
    """One query on one channel: the extracted answer, the full reply, the verdict and its tokens."""

    index: int
    question: str
    gold: str
    prediction: str
    reply: str
    correct: bool
    tokens: int
    delta_applied: bool | None = None


@dataclass(frozen=True)
class Failure:
    """One query that raised instead of answering: which example, on which process, and why (one line)."""

    index: int
    question: str
    rank: int
    message: str


@dataclass
class ChannelResult:
    """One channel over every example; token and byte counts are sums over the queries.

    `seconds_by_stage` adds each batched call's stage seconds once (over every process, when the
    queries were sharded); `wall_seconds` is how long the channel took start to end (on the
    slowest process, when sharded); `peak_memory_bytes` is the largest per-stage CUDA peak of any
    call (None per stage on CPU). `failures` are queries that raised (only sharded runs report
    them instead of stopping); they count as wrong. Tokens are processed tokens
    (`AgentUsage.processed_tokens`): prompt tokens read from a kept role prefix are left out
    (`cached_tokens` sums them), and each agent's prefix is charged once (`prefix_tokens`).
    """

    channel: str
    label: str | None = None  # its name in reports when it differs: `kv (LatentMAS)` while untrained
    predictions: list[Prediction] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)
    tokens_by_agent: dict[str, int] = field(default_factory=dict)
    tokens_by_stage: dict[str, int] = field(default_factory=lambda: {"senders": 0, "receiver": 0})
    cached_tokens: int = 0
    prefix_tokens: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    message_bytes: int = 0
    holders: list[str | None] = field(default_factory=list)
    donor_accuracy: float | None = None  # shuffled rows: replies right for the query whose message they got
    wall_seconds: float | None = None
    failures: list[Failure] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        asked = len(self.predictions) + len(self.failures)
        return self.correct / asked if asked else 0.0

    @property
    def refused_deltas(self) -> int:
        """Queries whose generated delta the guard refused (non-finite or over the bound)."""
        return sum(p.delta_applied is False for p in self.predictions)

    def accuracy_by_holder(self) -> dict[str, dict[str, float | int]]:
        """{sender: {"n", "accuracy"}} over the examples whose fact that sender held (`meta["holder"]`,
        as relay examples say); empty when no example says."""
        by: dict[str, list[bool]] = {}
        for holder, p in zip(self.holders, self.predictions, strict=True):
            if holder is not None:
                by.setdefault(holder, []).append(p.correct)
        return {h: {"n": len(v), "accuracy": sum(v) / len(v)} for h, v in sorted(by.items())}

    @property
    def seconds(self) -> float:
        return sum(self.seconds_by_stage.values())

    @property
    def tokens(self) -> int:
        return sum(self.tokens_by_agent.values())

    def add(self, examples: Sequence[Example], replies: Sequence[Reply], task: Task, receiver: str) -> None:
        """Score one batched call's replies and add its costs; `receiver` names the receiving agent."""
        self.add_call(replies[0])
        for example, reply in zip(examples, replies, strict=True):
            self.add_reply(len(self.predictions), example, reply, task, receiver)

    def add_call(self, reply: Reply) -> None:
        """Add the stage seconds and memory peaks of the batched call that gave `reply` (shared by its batch)."""
        for stage, seconds in reply.timings.items():
            self.seconds_by_stage[stage] = self.seconds_by_stage.get(stage, 0.0) + seconds
        for stage, peak in reply.peak_memory_bytes.items():
            known = self.peak_memory_bytes.get(stage)
            self.peak_memory_bytes[stage] = peak if known is None or peak is None else max(known, peak)

    def add_reply(self, index: int, example: Example, reply: Reply, task: Task, receiver: str) -> None:
        """Score the reply to example `index` of the evaluated set and add its tokens and bytes."""
        tokens = 0
        for agent, usage in reply.usage.by_agent.items():
            # An agent's role prefix runs once per backbone: charged once per run, at the longest
            # length any reply read it at, whether or not an earlier run had kept it already.
            prefix = max(0, usage.cached_tokens - self.prefix_tokens.get(agent, 0))
            self.prefix_tokens[agent] = self.prefix_tokens.get(agent, 0) + prefix
            ran = usage.processed_tokens + prefix
            tokens += ran
            self.tokens_by_agent[agent] = self.tokens_by_agent.get(agent, 0) + ran
            self.tokens_by_stage["receiver" if agent == receiver else "senders"] += ran
            self.cached_tokens += usage.cached_tokens
        self.kv_cache_bytes += reply.usage.kv_cache_bytes
        self.message_bytes += reply.message_bytes
        self.predictions.append(Prediction(
            index, example.question, example.answer, task.extract(reply.text, example), reply.text,
            task.score(reply.text, example), tokens, reply.delta_applied,
        ))
        self.holders.append(example.meta.get("holder"))


@dataclass(frozen=True)
class EvalResult:
    """Every channel's result on `n` examples of `task`, in the order the channels ran.

    `ablations[channel][row]`: that channel answering with ablated messages (`tflow.channels.weights.diagnostics`);
    `diagnostics[channel]`: `Ablations.summarize` (weights: `tflow.channels.weights.diagnostics.summarize`) of its messages. Both only for channels
    with a trained part. `processes`: how many the channel runs were sharded over (`tflow.evaluation.sharded`).
    """

    task: str
    n: int
    channels: dict[str, ChannelResult]
    ablations: dict[str, dict[str, ChannelResult]] = field(default_factory=dict)
    diagnostics: dict[str, dict] = field(default_factory=dict)
    processes: int = 1


def parse_channels(spec: str | Sequence[str]) -> list[str]:
    """Channel names from `"none,text"` or a list, in order, repeats dropped.

    Raises:
        ChannelError: no channel, or a name that is not a channel (the valid ones are listed).
    """
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in registry.available()]
    if unknown or not names:
        what = f"unknown channel(s) {', '.join(map(repr, unknown))}" if unknown else "no channel given"
        raise ChannelError(f"{what}; choose from: {', '.join(registry.available())}")
    return names


DIAGNOSTIC_QUERIES = 64
"""Queries the delta diagnostics cover when no ablation asks for all of them."""


def evaluate(team: Team, task: Task, examples: Sequence[Example], channels: str | Sequence[str], *,
             batch_size: int = 8, progress: bool = False, ablations: str | Sequence[str] | None = None) -> EvalResult:
    """Run each channel over `examples` in batched `team.communicate` calls and score the replies.

    Each query is `task.prompt(example)` with the example's per-sender contexts; decoding uses
    the team recipe's `generate` settings. Every channel with a trained part (weights) also gets
    its diagnostics, and a result per ablation row when `ablations` names any (`tflow.channels.weights.diagnostics`).
    The diagnostics rerun the senders and the generator and keep every delta in memory, so without
    ablations they cover the first `DIAGNOSTIC_QUERIES` examples only; with ablations, all of them.

    Raises:
        ChannelError: an unknown channel (checked before anything runs), or one the team cannot run.
        AblationError: an unknown ablation, drop-sender with one sender, shuffled with one example,
            or ablations with no channel that has a trained part (checked before anything runs).
        DataError: no examples.
        QueryError: batch_size < 1.
    """
    names, chosen = check_inputs(team, examples, channels, batch_size, ablations)
    result = EvalResult(task.name, len(examples), {})
    with progress_bar(progress) as bar:
        for channel in names:
            record = registry.get(channel)
            if record.part is not None and record.part.compare_untrained and not record.untrained(team.receiver):
                with untrained(team.receiver, channel):  # the trained control's untrained row beside it
                    result.channels[f"{channel}{UNTRAINED}"] = run_channel(team, task, examples, channel, batch_size, bar)
            result.channels[channel] = run_channel(team, task, examples, channel, batch_size, bar)
        add_checks(result, team, task, examples, chosen, batch_size, bar)
    return result


UNTRAINED = "@untrained"
"""The suffix of a report row that ran a trained control without its part (`none@untrained`)."""


@contextmanager
def untrained(receiver, channel: str):
    """The receiver without its trained part of `channel` (put back after)."""
    held = registry.trained_part(receiver, channel)
    registry.set_trained_part(receiver, channel, None)
    try:
        yield
    finally:
        registry.set_trained_part(receiver, channel, held)


def check_inputs(team: Team, examples: Sequence[Example], channels: str | Sequence[str], batch_size: int,
                 ablations: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The channel names and the chosen ablations, checked as `evaluate` documents."""
    names = parse_channels(channels)
    chosen = parse_ablations(ablations, names, [s.name for s in team.senders])
    if not examples:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise QueryError(f"batch_size must be >= 1, got {batch_size}")
    for name in names:
        checks = registry.get(name).ablations
        if chosen and checks is not None and checks.check is not None:
            checks.check(team, [n for n in chosen if n in checks.names])
    if "shuffled" in chosen and len(examples) < 2:
        raise AblationError("shuffled needs at least 2 examples to swap messages between, got 1")
    return names, chosen


def progress_bar(shown: bool) -> Progress:
    """The progress display of the channel runs (a no-op when not `shown`)."""
    columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, disable=not shown)


def add_checks(result: EvalResult, team: Team, task: Task, examples: Sequence[Example], chosen: Sequence[str],
               batch_size: int, bar: Progress) -> None:
    """Add the diagnostics, and the `chosen` ablation rows, of every channel in `result` with a trained part."""
    for channel in (c for c in result.channels if not c.endswith(UNTRAINED)):
        checks = registry.get(channel).ablations
        if checks is None:
            continue
        if checks.summarize is None and not chosen:
            continue
        sample = examples if chosen else examples[:DIAGNOSTIC_QUERIES]
        messages = checks.collect(team.senders, team.receiver, [task.prompt(ex) for ex in sample],
                                  [ex.contexts for ex in sample], batch_size, chosen,
                                  **channel_settings(team.recipe, channel))
        if checks.summarize is not None:
            result.diagnostics[channel] = checks.summarize(messages, team.receiver)
        if chosen:
            rows = checks.ablate(messages, [n for n in chosen if n in checks.names])
            result.ablations[channel] = {row: run_channel(team, task, examples, channel, batch_size, bar, (row, m))
                                         for row, m in rows.items()}
            _score_donors(result.ablations[channel].get("shuffled"), task, examples)


def run_channel(team: Team, task: Task, examples: Sequence[Example], channel: str, batch_size: int,
                bar: Progress | None = None, ablation: tuple[str, object] | None = None) -> ChannelResult:
    """One channel over every example in batched calls, scored; `bar` shows its progress (none
    shown without one); `ablation` = (row, messages over all examples) answers with those messages
    instead of the channel's own."""
    bar = bar if bar is not None else progress_bar(False)
    result = ChannelResult(channel, team.label(channel))
    label = result.label if ablation is None else f"{channel} · {ablation[0]}"
    job = bar.add_task(f"{task.name} · {label}", total=len(examples))
    began = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        rows = slice(start, start + batch_size)
        batch = examples[rows]
        given = {}
        if ablation is not None:
            record = registry.get(channel)
            given[record.message_keyword] = record.ablations.part(ablation[1], rows)
        replies = team.communicate([task.prompt(ex) for ex in batch], channel=channel,
                                   contexts=[ex.contexts for ex in batch], **given)
        result.add(batch, replies, task, team.receiver.name)
        bar.advance(job, len(batch))
    result.wall_seconds = time.perf_counter() - began
    return result


def _score_donors(shuffled: ChannelResult | None, task: Task, examples: Sequence[Example]) -> None:
    """Set the shuffled row's `donor_accuracy`: its replies scored against the examples whose
    messages they got (`tflow.evaluation.ablations.derangement`, as the ablation draws it)."""
    if shuffled is None:
        return
    donors = [examples[j] for j in derangement(len(examples))]
    right = [task.score(p.reply, donor) for p, donor in zip(shuffled.predictions, donors, strict=True)]
    shuffled.donor_accuracy = sum(right) / len(right)
