"""Aggregation: evals of one setup (say, several training seeds) as one table of means, ranges and
intervals, written as aggregate.json, aggregate.md and aggregate.png.

Only evals of the same task, split, queries, channels and recipe (its `seed` and `train.out_dir`
aside) are aggregated. A recipe key that one report lacks, because an older tflow wrote it before
the key existed, is taken at its current default (a new key's default keeps the old behaviour).
The evals answered the same queries, so the interval of the mean resamples them once for all
evals (`stats.joint_interval`). Time is compared only within an eval: a ratio per run, then their
range, because runs may have run on different machines or under different load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tflow.config.recipe import schema_defaults
from tflow.errors import AggregateError
from tflow.evaluation.report import REFERENCES, headers, interval_cell, md_row, terminal_tables
from tflow.evaluation.stats import LEVEL, RESAMPLES, joint_interval
from tflow.io import atomic_write, atomic_write_text, writable_dir

AGGREGATE_FILES = ("aggregate.json", "aggregate.md", "aggregate.png")
IGNORED_KEYS = ("seed", "train.out_dir")
"""Recipe keys that may differ between aggregated evals: the seed varies by design, and where a run
wrote its checkpoint says nothing about how it ran."""
COLUMNS = ("channel", "mean accuracy (%)", "range (%)", "95% interval (%)", "tokens / query", "time (s)",
           *(f"time vs {{{r}}} (range)" for r in REFERENCES))
NOTE = (
    "Mean and range (min–max) of each eval's accuracy; the interval is a 95% percentile bootstrap of the mean "
    f"accuracy that resamples the queries once for all evals, which answered the same queries ({RESAMPLES} "
    "resamples, seed 0). Tokens per query "
    "and time: means over the evals. A time ratio is taken within each eval, then its range over the evals "
    "is shown; — where that channel was not run."
)


def aggregate(runs: Sequence[str | Path]) -> dict:
    """The aggregate of the evals in folders `runs` (each holding a `tflow eval` report.json).

    Raises:
        AggregateError: no run, a report.json missing, unreadable or without provenance, or two
            evals that differ in task, split, queries, channel set or recipe (named in the message).
    """
    if not runs:
        raise AggregateError("no eval to aggregate: pass the --out folders of tflow eval runs")
    reports = [read_report(run) for run in runs]
    for run, report in zip(runs[1:], reports[1:], strict=True):
        _check_same(runs[0], reports[0], run, report)
    first = reports[0]
    return {
        "task": first["task"], "split": first["provenance"]["split"], "n": first["n"],
        "bootstrap": {"resamples": RESAMPLES, "seed": 0, "level": LEVEL},
        "runs": [_run(run, r["provenance"]) for run, r in zip(runs, reports, strict=True)],
        "channels": {name: _channel(name, runs, reports) for name in first["channels"]},
    }


def read_report(run: str | Path) -> dict:
    """The report.json in folder `run`, which must carry provenance.

    Raises:
        AggregateError: it is missing, not JSON, or has no provenance.
    """
    path = Path(run) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AggregateError(f"{path} does not exist; pass the --out folder of a tflow eval run") from None
    except (OSError, ValueError) as err:
        raise AggregateError(f"cannot read {path}: {err}") from None
    if not isinstance(report, dict) or not report.get("provenance"):
        raise AggregateError(f"{path} has no provenance (written by an older tflow eval); run tflow eval again")
    return report


def _check_same(first_run, first: dict, run, report: dict) -> None:
    """Raise AggregateError naming the first thing in which eval `run` differs from `first_run`."""
    def differ(what: str, a, b) -> AggregateError:
        return AggregateError(f"cannot aggregate {first_run} and {run}: {what} differs ({a} vs {b})")

    checks = [("task", first["task"], report["task"]),
              ("split", first["provenance"]["split"], report["provenance"]["split"]),
              ("queries evaluated (n)", first["n"], report["n"]),
              ("channel set", ", ".join(sorted(first["channels"])), ", ".join(sorted(report["channels"])))]
    for what, a, b in checks:
        if a != b:
            raise differ(what, a, b)
    mine, theirs = (_flatten(r["provenance"]["recipe"]["resolved"]) for r in (first, report))
    defaults = schema_defaults()  # a key one report lacks (an older tflow's) is taken at its default
    for key in sorted(set(mine) | set(theirs)):
        a, b = (r[key] if key in r else defaults.get(key, "unset") for r in (mine, theirs))
        if key not in IGNORED_KEYS and a != b:
            raise differ(f"recipe key {key}", a, b)


def _flatten(data, prefix: str = "") -> dict:
    """A nested recipe as {dotted.key: value}, as overrides name the keys (list items by index)."""
    if isinstance(data, dict) and data:
        items = data.items()
    elif isinstance(data, list) and data:
        items = enumerate(data)
    else:
        return {prefix.rstrip("."): data}
    return {k: v for key, value in items for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _run(run, p: dict) -> dict:
    """One eval's entry in the aggregate: where it came from (`p`, its provenance), in brief."""
    checkpoint = p["checkpoint"] or {}
    return {"dir": str(run), "recipe_sha256": p["recipe"]["sha256"], "seed": p["seed"],
            "training_seed": checkpoint.get("seed"), "steps": checkpoint.get("steps"),
            "commit": p["tflow"]["commit"], "date": p["date"], "cpu": p["machine"]["cpu"], "gpu": p["machine"]["gpu"]}


def _verdicts(name: str, runs) -> list[list[bool]]:
    """Channel `name`'s verdict on each query, in query order, per eval (its predictions.jsonl).

    Raises:
        AggregateError: an eval without predictions.jsonl, or evals that asked other questions.
    """
    from tflow.evaluation.paired import read_row  # paired reads reports through this module

    rows = [read_row(f"{run}:{name}") for run in runs]
    for run, row in zip(runs[1:], rows[1:], strict=True):
        if row.questions != rows[0].questions:
            raise AggregateError(f"cannot aggregate {runs[0]} and {run}: the queries differ (the evals asked other "
                                 "questions)")
    return [row.correct for row in rows]


def _spread(values: list[float]) -> dict:
    """{"mean", "min", "max"} of `values`."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _channel(name: str, runs, reports: list[dict]) -> dict:
    """One channel over the evals: accuracy (mean, range, joint interval), tokens, time and time ratios."""
    mine = [r["channels"][name] for r in reports]
    verdicts = _verdicts(name, runs)
    ratios = {}
    for reference in REFERENCES:
        if reference != name and reference in reports[0]["channels"]:
            per_run = [r["channels"][name]["seconds"] / r["channels"][reference]["seconds"]
                       for r in reports if r["channels"][reference]["seconds"]]
            ratios[reference] = {"min": min(per_run), "max": max(per_run), "runs": per_run} if per_run else None
    return {
        "label": mine[0].get("label", name),
        "accuracy": {**_spread([c["accuracy"] for c in mine]), "interval": list(joint_interval(verdicts)),
                     "runs": [c["accuracy"] for c in mine]},
        "tokens_per_query": _spread([c["tokens_per_query"] for c in mine]),
        "seconds": _spread([c["seconds"] for c in mine]),
        "time_ratio": ratios,
    }


def write_aggregate(summary: dict, out: str | Path) -> None:
    """Write the `AGGREGATE_FILES` of `summary` (what `aggregate` returns) into folder `out`, atomically.

    Raises:
        OutputError: `out` cannot be created or written.
    """
    out = writable_dir(out)
    atomic_write_text(out / "aggregate.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "aggregate.md", markdown(summary))
    atomic_write(out / "aggregate.png", lambda tmp: figure(summary).savefig(tmp, format="png", dpi=120))


def table_rows(summary: dict) -> list[list[str]]:
    """One row of `COLUMNS` per channel."""
    def ratio(r: dict | None) -> str:
        return "—" if r is None else f"{r['min']:.2f}×–{r['max']:.2f}×"

    rows = []
    for c in summary["channels"].values():
        a = c["accuracy"]
        rows.append([c["label"], f"{100 * a['mean']:.2f}", f"{100 * a['min']:.2f}–{100 * a['max']:.2f}",
                     interval_cell(a["interval"]), f"{c['tokens_per_query']['mean']:.1f}", f"{c['seconds']['mean']:.2f}",
                     *(ratio(c["time_ratio"].get(r)) for r in REFERENCES)])
    return rows


def markdown(summary: dict) -> str:
    """aggregate.md: the evals aggregated, then the table."""
    out = [f"# {summary['task']}: {len(summary['runs'])} evals aggregated (split {summary['split']}, "
           f"n = {summary['n']} each)", ""]
    for r in summary["runs"]:
        steps = ", ".join(f"{c} {s} steps" for c, s in (r["steps"] or {}).items()) or "no checkpoint"
        trained = "" if r["training_seed"] is None else f", trained with seed {r['training_seed']}"
        out.append(f"- `{r['dir']}`: seed {r['seed']}{trained}, {steps}; recipe sha256 `{r['recipe_sha256'][:12]}`, "
                   f"commit {(r['commit'] or 'unknown')[:12]}, {r['date']}, CPU {r['cpu'] or 'unknown'}"
                   + (f", GPU {r['gpu']}" if r["gpu"] else ""))
    out += ["", md_row(headers(COLUMNS, summary["channels"])), md_row(["---"] * len(COLUMNS)), *map(md_row, table_rows(summary)), "", NOTE]
    return "\n".join(out) + "\n"


def render_table(summary: dict) -> str:
    """The aggregate table as terminal text."""
    return terminal_tables([(headers(COLUMNS, summary["channels"]), table_rows(summary),
                             f"{summary['task']}: {len(summary['runs'])} evals (n = {summary['n']} each)")])


def figure(summary: dict):
    """aggregate.png (drawn by Agg): mean accuracy with its interval and each eval's accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    channels = summary["channels"]
    for x, c in enumerate(channels.values()):
        a = c["accuracy"]
        low, high = a["interval"]
        ax.bar(x, 100 * a["mean"], color="tab:blue", alpha=0.6)
        ax.errorbar(x, 100 * a["mean"], yerr=[[100 * (a["mean"] - low)], [100 * (high - a["mean"])]], color="black",
                    capsize=5)
        ax.scatter([x] * len(a["runs"]), [100 * v for v in a["runs"]], color="tab:red", zorder=3, s=18)
    ax.set_xticks(range(len(channels)), [c["label"] for c in channels.values()])
    ax.set(ylabel="accuracy (%)", ylim=(0, 105),
           title=f"{summary['task']}: mean of {len(summary['runs'])} evals, 95% interval, each eval (dots)")
    return fig
