"""Paired differences between channels of different evals (`tflow paired`): a channel of one eval
against channels of others, on the same queries of the same task and split, each difference with
its paired bootstrap interval. Replies are greedy, so two evals of one checkpoint agree, and rows
that a single eval could not hold (a trained control's checkpoint beside a generator's) pair up.

A row is `RUN_DIR:CHANNEL`, where CHANNEL is a name in that eval's predictions.jsonl: a channel
(`weights`, `none@untrained`) or an ablation row (`weights/shuffled`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tflow.errors import AggregateError
from tflow.evaluation.aggregate import read_report
from tflow.evaluation.stats import LEVEL, RESAMPLES, paired_difference


@dataclass(frozen=True)
class Row:
    """One channel of one eval: its verdicts in query order, and what they were asked."""

    task: str
    split: str
    questions: list[str]
    correct: list[bool]


def read_row(spec: str) -> Row:
    """The verdicts of `RUN_DIR:CHANNEL`.

    Raises:
        AggregateError: no `:`, a run without report.json or predictions.jsonl, or a channel the
            eval did not run (the ones it ran are named).
    """
    run, sep, channel = spec.rpartition(":")
    if not sep or not run or not channel:
        raise AggregateError(f"{spec!r}: give RUN_DIR:CHANNEL, the --out folder of a tflow eval and one of its "
                             "channels, e.g. runs/eval:weights")
    report = read_report(run)
    path = Path(run) / "predictions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AggregateError(f"{path} does not exist; pass the --out folder of a tflow eval run") from None
    rows = [json.loads(line) for line in lines if line.strip()]
    mine = sorted((r for r in rows if r["channel"] == channel), key=lambda r: r["index"])
    if not mine:
        ran = ", ".join(dict.fromkeys(r["channel"] for r in rows))
        raise AggregateError(f"{spec}: the eval in {run} ran no channel {channel!r}; it ran {ran}")
    return Row(report["task"], report["provenance"]["split"], [r["question"] for r in mine],
               [bool(r["correct"]) for r in mine])


def paired(base: str, others: Sequence[str]) -> list[dict]:
    """base − other for each of `others`: {"base", "other", "n", "difference", "interval"} (fractions).

    Raises:
        AggregateError: as `read_row`; no other row; or an other row of another task, split or set
            of queries than base's (named in the message).
    """
    if not others:
        raise AggregateError("give at least two rows, RUN_DIR:CHANNEL each: the first minus every other")
    first = read_row(base)
    results = []
    for spec in others:
        row = read_row(spec)
        for what, a, b in (("task", first.task, row.task), ("split", first.split, row.split),
                           ("number of queries", len(first.questions), len(row.questions))):
            if a != b:
                raise AggregateError(f"cannot pair {base} and {spec}: {what} differs ({a} vs {b})")
        if row.questions != first.questions:
            i = next(i for i, (a, b) in enumerate(zip(first.questions, row.questions, strict=True)) if a != b)
            raise AggregateError(f"cannot pair {base} and {spec}: query {i} differs ({first.questions[i][:60]!r} "
                                 f"vs {row.questions[i][:60]!r})")
        difference, low, high = paired_difference(first.correct, row.correct)
        results.append({"base": base, "other": spec, "n": len(row.correct), "difference": difference,
                        "interval": [low, high]})
    return results


def table(results: Sequence[dict]) -> str:
    """The differences as a markdown table, in points, with a note on the interval."""
    lines = ["| base − other | difference (points) | 95% interval | queries |", "|---|---|---|---|"]
    for r in results:
        low, high = r["interval"]
        lines.append(f"| {r['base']} − {r['other']} | {100 * r['difference']:+.1f} | "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}] | {r['n']} |")
    lines.append(f"\nPaired percentile bootstrap over the queries ({RESAMPLES} resamples, seed 0, level {LEVEL}).")
    return "\n".join(lines)
