"""Training curves (`tflow curves`): one metric of several runs' metrics.csv against step, in one
plot, so a reader sees which run learns and how fast (say val_accuracy, logged with
`train.val_answers`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from tflow.errors import DataError
from tflow.io import atomic_write

Curve = list[tuple[int, float]]


def read_curve(run: Path, metric: str) -> Curve:
    """(step, value) of every row of the run's metrics.csv that logged `metric`, in file order.

    `run` is a metrics.csv or the folder holding it (a weights run's train.out_dir, or the
    `<channel>-run` folder of kv, latent and the trained controls).

    Raises:
        DataError: no metrics.csv there, or no row with `metric` (the metrics it has are named).
    """
    file = run if run.is_file() else run / "metrics.csv"
    if not file.is_file():
        raise DataError(f"{run}: no metrics.csv; give a training run's folder (train.out_dir for weights, "
                        "train.out_dir/<channel>-run for kv, latent and the controls)")
    with file.open(newline="") as f:
        rows = list(csv.DictReader(f))
    points = [(int(r["step"]), float(r[metric])) for r in rows if r.get(metric)]
    if not points:
        logged = sorted({k for r in rows for k, v in r.items() if v and k not in ("step", "epoch")})
        hint = " (val_accuracy is logged by runs with train.val_answers > 0)" if metric == "val_accuracy" else ""
        raise DataError(f"{file}: no {metric!r} logged; it has {', '.join(logged) or 'no metric'}{hint}")
    return points


def labels_for(runs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """The given labels, one per run, or each run folder's name.

    Raises:
        DataError: a number of labels other than the number of runs.
    """
    if not labels:
        return [(run.parent if run.is_file() else run).name for run in runs]
    if len(labels) != len(runs):
        raise DataError(f"{len(labels)} --label for {len(runs)} runs; give one label per run, in order, or none")
    return list(labels)


def write_plot(curves: dict[str, Curve], metric: str, out: Path, title: str | None = None) -> None:
    """Draw every curve (Agg) into the png `out`, atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, points in curves.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set(xlabel="optimizer step", ylabel=metric, title=title or metric)
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def table(curves: dict[str, Curve], metric: str) -> str:
    """A markdown table: per run, the metric at the first and last logged step and its best."""
    best = max if "acc" in metric else min
    lines = [f"| run | first | last | best ({best.__name__}) |", "|---|---|---|---|"]
    for label, points in curves.items():
        (s0, v0), (s1, v1) = points[0], points[-1]
        top = best(points, key=lambda p: p[1])
        lines.append(f"| {label} | {v0:.3f} @ {s0} | {v1:.3f} @ {s1} | {top[1]:.3f} @ {top[0]} |")
    return "\n".join(lines)
