"""report.png: the report drawn with matplotlib (Agg): accuracy against processed tokens, seconds
per stage, ablation accuracies and the delta diagnostics."""

from __future__ import annotations

from tflow.evaluation.evaluate import STAGES


def figure(report: dict):
    """report.png (drawn by Agg): accuracy vs processed tokens and seconds per stage, per channel;
    with a trained channel, its ablation accuracies, and a row of its delta diagnostics."""
    from matplotlib.figure import Figure

    diagnostics = report.get("diagnostics", {})
    cols = 3 if diagnostics else 2
    fig = Figure(figsize=(5.5 * cols, 4.2 * (1 + len(diagnostics))), layout="constrained")
    axes = fig.subplots(1 + len(diagnostics), cols, squeeze=False)
    left, right = axes[0][:2]
    channels = report["channels"]
    for name, c in channels.items():
        point = (c["tokens"]["total"], 100 * c["accuracy"])
        low, high = c["interval"] or (c["accuracy"],) * 2
        left.errorbar(*point, yerr=[[point[1] - 100 * low], [100 * high - point[1]]], fmt="o", markersize=8, capsize=4)
        left.annotate(c.get("label", name), point, textcoords="offset points", xytext=(6, 4))
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
    if diagnostics:
        _ablation_panel(axes[0][2], report)
    for row, (channel, d) in zip(axes[1:], diagnostics.items(), strict=True):
        _diagnostics_panels(row, channel, d)
    return fig


def _ablation_panel(ax, report: dict) -> None:
    """Accuracy of each trained channel and its ablation rows, with the none channel as a line."""
    bars = {}
    for channel, rows in report.get("ablations", {}).items():
        bars[channel] = report["channels"][channel]["accuracy"]
        bars.update({f"{channel}/{row}": c["accuracy"] for row, c in rows.items()})
    if not bars:
        ax.text(0.5, 0.5, "no ablations run\n(tflow eval --ablations ...)", ha="center", va="center")
        ax.set_axis_off()
        return
    ax.bar(list(bars), [100 * a for a in bars.values()], color="tab:purple")
    if "none" in report["channels"]:
        ax.axhline(100 * report["channels"]["none"]["accuracy"], color="gray", linestyle="--", label="none")
        ax.legend()
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title="does the message carry the query?")
    ax.tick_params(axis="x", labelrotation=30)


def _diagnostics_panels(row, channel: str, d: dict) -> None:
    """Mean norm by layer and kind, per-query norms against max_delta_norm, cross-query cosines."""
    heat, norms, cosine = row
    if d["norms"] is not None:
        grid = d["norms"]
        values = [[float("nan") if v is None else v for v in r] for r in grid["mean_norm"]]
        image = heat.imshow(values, aspect="auto", cmap="viridis")
        heat.set(xticks=range(len(grid["kinds"])), xticklabels=grid["kinds"], yticks=range(len(grid["layers"])),
                 yticklabels=grid["layers"], ylabel="layer", title=f"{channel}: mean delta norm")
        heat.tick_params(axis="x", labelrotation=45)
        heat.figure.colorbar(image, ax=heat)
    else:
        heat.set_axis_off()
    finite = [n for n in d["row_norms"] if n is not None]
    norms.hist(finite, bins=30, color="tab:blue")
    if d["max_delta_norm"] is not None:
        norms.axvline(d["max_delta_norm"], color="tab:red", linestyle="--", label=f"max_delta_norm {d['max_delta_norm']:g}")
        norms.legend()
    norms.set(xlabel="delta norm", ylabel="queries",
              title="per-query delta norm" + ("" if d["max_delta_norm"] is not None else " (no max_delta_norm set)"))
    c = d["cosine"]
    if c is not None:
        edges, counts = c["histogram"]["edges"], c["histogram"]["counts"]
        cosine.stairs(counts, edges, fill=True, color="tab:green")
        cosine.axvline(c["mean"], color="black", linestyle="--", label=f"mean {c['mean']:.3f}")
        cosine.legend()
    cosine.set(xlabel="cosine similarity", ylabel="query pairs", xlim=(-1.05, 1.05),
               title="between different queries' deltas")
