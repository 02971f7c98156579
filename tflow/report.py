"""Evaluation reports: report.json, report.md (the paper's table), report.png and predictions.jsonl.

All four are rendered from one dict (`report_dict`), so they agree with each other.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tflow.evaluate import STAGES, ChannelResult, EvalResult
from tflow.io import atomic_write, atomic_write_text, writable_dir

REPORT_FILES = ("report.json", "report.md", "report.png", "predictions.jsonl")
COLUMNS = ("channel", "accuracy (%)", "processed tokens", "time (s)",
           "tokens vs text", "tokens vs none", "time vs text", "time vs none")
NOTE = (
    "Processed tokens: prompt tokens (padding excluded) + generated tokens (through the first EOS) "
    "of every agent, sender prefill included, summed over all queries. Time: wall seconds of every "
    "stage, each batched call counted once. A ratio is this channel's value over the named "
    "channel's; — where that channel was not run."
)


def report_dict(result: EvalResult) -> dict:
    """The report as plain data: what report.json holds and the other files render."""
    return {"task": result.task, "n": result.n,
            "channels": {name: _channel(r, result.n) for name, r in result.channels.items()}}


def _channel(r: ChannelResult, n: int) -> dict:
    return {
        "accuracy": r.accuracy,
        "correct": r.correct,
        "seconds": r.seconds,
        "seconds_by_stage": r.seconds_by_stage,
        "peak_memory_bytes": r.peak_memory_bytes,
        "tokens": {"total": r.tokens, "by_agent": r.tokens_by_agent, "by_stage": r.tokens_by_stage},
        "tokens_per_query": r.tokens / n,
        "kv_cache_bytes": r.kv_cache_bytes,
        "message_bytes": r.message_bytes / n,
        "refused_deltas": r.refused_deltas,
    }


def write_report(result: EvalResult, out: str | Path) -> dict:
    """Write the four `REPORT_FILES` into folder `out`, each atomically; returns `report_dict`.

    Raises:
        OutputError: `out` cannot be created or written.
    """
    out = writable_dir(out)
    report = report_dict(result)
    lines = [json.dumps({"channel": name, **asdict(p)}) + "\n"
             for name, r in result.channels.items() for p in r.predictions]
    atomic_write_text(out / "predictions.jsonl", "".join(lines))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write(out / "report.png", lambda tmp: figure(report).savefig(tmp, format="png", dpi=120))
    return report


def table_rows(report: dict) -> list[list[str]]:
    """One row of `COLUMNS` per channel; ratios only against channels that were run."""
    channels = report["channels"]

    def ratio(name: str, reference: str, value: Callable[[dict], float]) -> str:
        if reference not in channels or not value(channels[reference]):
            return "—"
        return f"{value(channels[name]) / value(channels[reference]):.2f}×"

    def tokens(c: dict) -> float:
        return c["tokens"]["total"]

    def seconds(c: dict) -> float:
        return c["seconds"]

    return [
        [name, f"{100 * c['accuracy']:.2f}", str(c["tokens"]["total"]), f"{c['seconds']:.2f}",
         ratio(name, "text", tokens), ratio(name, "none", tokens),
         ratio(name, "text", seconds), ratio(name, "none", seconds)]
        for name, c in channels.items()
    ]


def markdown(report: dict) -> str:
    """report.md: the channel table, then the costs per stage."""
    out = [f"# {report['task']}: channels compared (n = {report['n']})", "",
           _md_row(COLUMNS), _md_row(["---"] * len(COLUMNS)), *map(_md_row, table_rows(report)), "", NOTE, "",
           "## Costs per stage", "",
           _md_row(["channel", "sender tokens", "receiver tokens", *(f"{s} (s)" for s in STAGES),
                    "message bytes / query", "KV-cache bytes / query"]),
           _md_row(["---"] * 8)]
    for name, c in report["channels"].items():
        stage_seconds = [f"{c['seconds_by_stage'][s]:.2f}" if s in c["seconds_by_stage"] else "—" for s in STAGES]
        out.append(_md_row([name, str(c["tokens"]["by_stage"]["senders"]), str(c["tokens"]["by_stage"]["receiver"]),
                            *stage_seconds, f"{c['message_bytes']:.0f}", f"{c['kv_cache_bytes'] / report['n']:.0f}"]))
    return "\n".join(out) + "\n"


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def render_table(report: dict) -> str:
    """The channel table as terminal text (a rich table)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*COLUMNS, title=f"{report['task']} (n = {report['n']})")
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip("\n")


def figure(report: dict):
    """report.png (drawn by Agg): accuracy vs processed tokens, and seconds per stage, per channel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    channels = report["channels"]
    for name, c in channels.items():
        point = (c["tokens"]["total"], 100 * c["accuracy"])
        left.scatter(*point, s=60)
        left.annotate(name, point, textcoords="offset points", xytext=(6, 4))
    left.set(xlabel="processed tokens", ylabel="accuracy (%)", ylim=(-5, 105),
             title=f"{report['task']}: accuracy vs processed tokens")
    left.margins(x=0.2)  # room for the labels of the outermost points
    bottom = [0.0] * len(channels)
    for stage in STAGES:
        heights = [c["seconds_by_stage"].get(stage, 0.0) for c in channels.values()]
        right.bar(list(channels), heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    right.set(ylabel="seconds", title="time per stage")
    right.legend()
    return fig
