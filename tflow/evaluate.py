"""Evaluation: every channel over one task's examples, under one harness and one cost ledger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from tflow.channels import CHANNELS
from tflow.errors import ChannelError, DataError, QueryError
from tflow.reply import Reply
from tflow.tasks import Example, Task
from tflow.team import Team

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


@dataclass
class ChannelResult:
    """One channel over every example; token and byte counts are sums over the queries.

    `seconds_by_stage` adds each batched call's stage seconds once; `peak_memory_bytes` is the
    largest per-stage CUDA peak of any call (None per stage on CPU).
    """

    channel: str
    predictions: list[Prediction] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)
    tokens_by_agent: dict[str, int] = field(default_factory=dict)
    tokens_by_stage: dict[str, int] = field(default_factory=lambda: {"senders": 0, "receiver": 0})
    kv_cache_bytes: int = 0
    message_bytes: int = 0

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.predictions) if self.predictions else 0.0

    @property
    def refused_deltas(self) -> int:
        """Queries whose generated delta the guard refused (non-finite or over the bound)."""
        return sum(p.delta_applied is False for p in self.predictions)

    @property
    def seconds(self) -> float:
        return sum(self.seconds_by_stage.values())

    @property
    def tokens(self) -> int:
        return sum(self.tokens_by_agent.values())

    def add(self, examples: Sequence[Example], replies: Sequence[Reply], task: Task, receiver: str) -> None:
        """Score one batched call's replies and add its costs; `receiver` names the receiving agent."""
        for stage, seconds in replies[0].timings.items():
            self.seconds_by_stage[stage] = self.seconds_by_stage.get(stage, 0.0) + seconds
        for stage, peak in replies[0].peak_memory_bytes.items():
            known = self.peak_memory_bytes.get(stage)
            self.peak_memory_bytes[stage] = peak if known is None or peak is None else max(known, peak)
        for example, reply in zip(examples, replies, strict=True):
            for agent, usage in reply.usage.by_agent.items():
                self.tokens_by_agent[agent] = self.tokens_by_agent.get(agent, 0) + usage.total_tokens
                self.tokens_by_stage["receiver" if agent == receiver else "senders"] += usage.total_tokens
            self.kv_cache_bytes += reply.usage.kv_cache_bytes
            self.message_bytes += reply.message_bytes
            self.predictions.append(Prediction(
                len(self.predictions), example.question, example.answer, task.extract(reply.text), reply.text,
                task.score(reply.text, example), reply.usage.total_tokens, reply.delta_applied,
            ))


@dataclass(frozen=True)
class EvalResult:
    """Every channel's result on `n` examples of `task`, in the order the channels ran."""

    task: str
    n: int
    channels: dict[str, ChannelResult]


def parse_channels(spec: str | Sequence[str]) -> list[str]:
    """Channel names from `"none,text"` or a list, in order, repeats dropped.

    Raises:
        ChannelError: no channel, or a name that is not a channel (the valid ones are listed).
    """
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in CHANNELS]
    if unknown or not names:
        what = f"unknown channel(s) {', '.join(map(repr, unknown))}" if unknown else "no channel given"
        raise ChannelError(f"{what}; choose from: {', '.join(CHANNELS)}")
    return names


def evaluate(team: Team, task: Task, examples: Sequence[Example], channels: str | Sequence[str], *,
             batch_size: int = 8, progress: bool = False) -> EvalResult:
    """Run each channel over `examples` in batched `team.communicate` calls and score the replies.

    Each query is `task.prompt(example)` with the example's per-sender contexts; decoding uses
    the team recipe's `generate` settings.

    Raises:
        ChannelError: an unknown channel (checked before anything runs), or one the team cannot run.
        DataError: no examples.
        QueryError: batch_size < 1.
    """
    names = parse_channels(channels)
    if not examples:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise QueryError(f"batch_size must be >= 1, got {batch_size}")
    results = {}
    columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar:
        for channel in names:
            result = results[channel] = ChannelResult(channel)
            job = bar.add_task(f"{task.name} · {channel}", total=len(examples))
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                replies = team.communicate([task.prompt(ex) for ex in batch], channel=channel,
                                           contexts=[ex.contexts for ex in batch])
                result.add(batch, replies, task, team.receiver.name)
                bar.advance(job, len(batch))
    return EvalResult(task.name, len(examples), results)
