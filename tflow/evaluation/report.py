"""Evaluation reports: report.json, report.md (the paper's table), report.png and predictions.jsonl.

All four are rendered from one dict (`report_dict`), so they agree with each other. Every accuracy
carries a percentile bootstrap interval over queries, and every pair of channels a paired one
(`tflow.evaluation.stats`); the report says where it came from (`tflow.evaluation.provenance`) and
warns when no channel answered anything. A channel with a trained part adds its delta diagnostics
and, when asked, its ablation rows (`tflow.channels.weights.diagnostics`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from tflow.evaluation.evaluate import STAGES, ChannelResult, EvalResult
from tflow.evaluation.figure import figure
from tflow.evaluation.stats import LEVEL, RESAMPLES, bootstrap_interval, paired_difference
from tflow.io import atomic_write, atomic_write_text, writable_dir

REPORT_FILES = ("report.json", "report.md", "report.png", "predictions.jsonl")
COLUMNS = ("channel", "accuracy (%)", "95% interval (%)", "processed tokens", "time (s)",
           "tokens vs {text}", "tokens vs {none}", "time vs {text}", "time vs {none}")
"""Column headers; `{none}` and `{text}` name the reference rows by their labels (`headers`)."""
NOTE = (
    "Processed tokens: prompt tokens (padding excluded) + generated tokens (through the first EOS) "
    "of every agent, sender prefill included, summed over all queries; prompt tokens a sender read "
    "from its role prefix, kept per backbone, are not counted (each prefix is counted once, for the "
    "query that first ran it). Time: wall seconds of every "
    "stage, each batched call counted once. A ratio is this channel's value over the named "
    "channel's; — where that channel was not run. Intervals: 95% percentile bootstrap over the queries "
    f"({RESAMPLES} resamples, seed 0; a failed query counts as wrong)."
)
REFERENCES = ("none", "text")
DIFFERENCE_NOTE = (
    "Accuracy of the row's channel minus the column's, in percentage points, on the same queries, with "
    "its 95% paired bootstrap interval (the queries resampled once for both channels); an interval "
    "that excludes 0 is a difference the queries resolve; — on the channel itself."
)
ABLATION_COLUMNS = ("row", "accuracy (%)", "95% interval (%)", "vs {channel} (points)", "vs {none} (points)",
                    "right for the donor (%)", "refused deltas")
ABLATION_NOTE = (
    "Every row answers every query with an edited message. shuffled: another query's (a fixed "
    "derangement of the evaluated set; right for the donor: replies that answer the query the "
    "message came from); static: the exact mean over the evaluated set; "
    "drop-sender:NAME: without NAME's share; scale:K: times K. If the message carries the query, "
    "shuffled and static fall to near none, and so does dropping the sender that holds what the "
    "query needs."
)


def report_dict(result: EvalResult, provenance: dict | None = None) -> dict:
    """The report as plain data: what report.json holds and the other files render.

    `provenance`: where the eval came from (`tflow.evaluation.provenance.provenance`), kept as given.
    """
    report = {"task": result.task, "n": result.n, "processes": result.processes, "provenance": provenance,
              "warnings": warnings(result, provenance), "bootstrap": {"resamples": RESAMPLES, "seed": 0, "level": LEVEL},
              "channels": {name: _channel(r, result.n) for name, r in result.channels.items()},
              "differences": {name: differences(r, result.channels) for name, r in result.channels.items()}}
    if result.ablations:
        report["ablations"] = {channel: {row: _ablation_row(r, channel, result) for row, r in rows.items()}
                               for channel, rows in result.ablations.items()}
    if result.diagnostics:
        report["diagnostics"] = result.diagnostics
    return report


def verdicts(r: ChannelResult) -> list[bool]:
    """Whether each query was answered right, in example order; a failed query counts as wrong."""
    by_index = {p.index: p.correct for p in r.predictions} | {f.index: False for f in r.failures}
    return [by_index[i] for i in sorted(by_index)]


def differences(r: ChannelResult, references: dict[str, ChannelResult]) -> dict[str, dict]:
    """{reference: {"difference", "interval"}}: `r`'s accuracy minus each other reference's, paired by query."""
    mine = verdicts(r)
    found = {}
    for name, reference in references.items():
        if reference is not r:
            diff, low, high = paired_difference(mine, verdicts(reference))
            found[name] = {"difference": diff, "interval": [low, high]}
    return found


def _ablation_row(r: ChannelResult, channel: str, result: EvalResult) -> dict:
    """An ablation row of `channel`: its keys as a channel's, and its differences against `channel` and none."""
    references = {name: result.channels[name] for name in (channel, "none") if name in result.channels}
    return {**_channel(r, result.n), "differences": differences(r, references)}


def warnings(result: EvalResult, provenance: dict | None = None) -> list[str]:
    """What makes the table meaningless: an eval on a split the checkpoint trained or validated on,
    channels whose predictions are all empty, accuracy 0 everywhere."""
    empty = [r.label or r.channel for r in result.channels.values() if not any(p.prediction.strip() for p in r.predictions)]
    found = []
    if provenance and provenance.get("on_training_split"):
        found.append(f"evaluated on the {provenance['split']!r} split, which the checkpoint was trained or validated "
                     "on (--on-training-split): these accuracies are not held-out")
    if empty:
        which = "every channel" if len(empty) == len(result.channels) else ", ".join(empty)
        found.append(f"the predictions of {which} are all empty: no reply held an answer the task could read")
    if all(r.accuracy == 0 for r in result.channels.values()):
        found.append("accuracy is 0 for every channel: check the model, the checkpoint and the task before reading "
                     "the table")
    return found


def _channel(r: ChannelResult, n: int) -> dict:
    outcomes = verdicts(r)
    return {
        "label": r.label or r.channel,
        "accuracy": r.accuracy,
        "interval": list(bootstrap_interval(outcomes)) if outcomes else None,
        "correct": r.correct,
        "seconds": r.seconds,
        "seconds_by_stage": r.seconds_by_stage,
        "wall_seconds": r.wall_seconds,
        "peak_memory_bytes": r.peak_memory_bytes,
        "tokens": {"total": r.tokens, "by_agent": r.tokens_by_agent, "by_stage": r.tokens_by_stage,
                   "cached": r.cached_tokens},
        "tokens_per_query": r.tokens / n,
        "kv_cache_bytes": r.kv_cache_bytes,
        "message_bytes": r.message_bytes / n,
        "refused_deltas": r.refused_deltas,
        "accuracy_by_holder": r.accuracy_by_holder(),
        "donor_accuracy": r.donor_accuracy,
        "errors": [asdict(f) for f in r.failures],
    }


def write_report(result: EvalResult, out: str | Path, provenance: dict | None = None) -> dict:
    """Write the four `REPORT_FILES` into folder `out`, each atomically; returns `report_dict`.

    Raises:
        OutputError: `out` cannot be created or written.
    """
    out = writable_dir(out)
    report = report_dict(result, provenance)
    rows = dict(result.channels)
    rows.update({f"{channel}/{row}": r for channel, ablated in result.ablations.items() for row, r in ablated.items()})
    lines = [json.dumps({"channel": name, **asdict(p)}) + "\n" for name, r in rows.items() for p in r.predictions]
    atomic_write_text(out / "predictions.jsonl", "".join(lines))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write(out / "report.png", lambda tmp: figure(report).savefig(tmp, format="png", dpi=120))
    return report


def headers(columns: Sequence[str], channels: dict, **fields: str) -> list[str]:
    """`columns` with each reference (`{none}`, `{text}`) named by its row's label: a ratio against
    the channel keyed `none` reads "vs none trained" where that row is the trained control."""
    names = {r: channels[r].get("label", r) if r in channels else r for r in REFERENCES}
    return [c.format(**names, **fields) for c in columns]


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
        [c.get("label", name), f"{100 * c['accuracy']:.2f}", interval_cell(c["interval"]), str(c["tokens"]["total"]),
         f"{c['seconds']:.2f}",
         ratio(name, "text", tokens), ratio(name, "none", tokens),
         ratio(name, "text", seconds), ratio(name, "none", seconds)]
        for name, c in channels.items()
    ]


def interval_cell(interval: list[float] | None) -> str:
    """An interval of fractions as `[low, high]` in percent."""
    return "—" if interval is None else f"[{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def points_cell(difference: dict | None) -> str:
    """A paired difference of fractions as `+d [+low, +high]` in percentage points."""
    if difference is None:
        return "—"
    low, high = difference["interval"]
    return f"{100 * difference['difference']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def difference_rows(report: dict) -> tuple[list[str], list[list[str]]] | None:
    """The header and rows of the paired differences against none and text (None when neither ran
    beside another channel)."""
    channels = report["channels"]
    references = [r for r in REFERENCES if r in channels]
    if not references or len(channels) < 2:
        return None
    header = headers(["channel", *(f"vs {{{r}}} (points)" for r in references)], channels)
    return header, [[c.get("label", name), *(points_cell(report["differences"][name].get(r)) for r in references)]
                    for name, c in channels.items()]


def ablation_rows(report: dict, channel: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of `channel`'s ablation table: the channel itself, then each ablation row.

    Points are accuracy differences in percentage points, with their paired intervals; a column of
    accuracy by the sender that held the fact is added where the examples say (relay) and more than
    one sender held one.
    """
    base = report["channels"][channel]
    same = {"difference": 0.0, "interval": [0.0, 0.0]}
    rows = {channel: {**base, "differences": {channel: same, **report["differences"][channel]}},
            **report.get("ablations", {}).get(channel, {})}
    holders = len(base["accuracy_by_holder"]) > 1
    header = headers(ABLATION_COLUMNS, report["channels"], channel=channel) + ["accuracy by holder (%)"] * holders
    table = []
    for name, c in rows.items():
        donor = "—" if c["donor_accuracy"] is None else f"{100 * c['donor_accuracy']:.2f}"
        row = [name, f"{100 * c['accuracy']:.2f}", interval_cell(c["interval"]),
               points_cell(c["differences"].get(channel)), points_cell(c["differences"].get("none")), donor,
               str(c["refused_deltas"])]
        if holders:
            row.append(", ".join(f"{h} {100 * v['accuracy']:.2f}" for h, v in c["accuracy_by_holder"].items()))
        table.append(row)
    return header, table


def markdown(report: dict) -> str:
    """report.md: warnings, provenance, the channel table and its paired differences, the costs per
    stage, then each trained channel's checks."""
    out = [f"# {report['task']}: channels compared (n = {report['n']})", ""]
    for warning in report["warnings"]:
        out += [f"**Warning:** {warning}.", ""]
    if report["provenance"]:
        out += [*provenance_lines(report["provenance"]), ""]
    out += [md_row(headers(COLUMNS, report["channels"])), md_row(["---"] * len(COLUMNS)), *map(md_row, table_rows(report)),
            "", NOTE, ""]
    paired = difference_rows(report)
    if paired is not None:
        header, rows = paired
        out += ["## Paired differences", "", md_row(header), md_row(["---"] * len(header)), *map(md_row, rows),
                "", DIFFERENCE_NOTE, ""]
    out += ["## Costs per stage", "",
            md_row(["channel", "sender tokens", "receiver tokens", *(f"{s} (s)" for s in STAGES),
                    "message bytes / query", "KV-cache bytes / query"]),
            md_row(["---"] * 8)]
    for name, c in report["channels"].items():
        stage_seconds = [f"{c['seconds_by_stage'][s]:.2f}" if s in c["seconds_by_stage"] else "—" for s in STAGES]
        out.append(md_row([c.get("label", name), str(c["tokens"]["by_stage"]["senders"]), str(c["tokens"]["by_stage"]["receiver"]),
                           *stage_seconds, f"{c['message_bytes']:.0f}", f"{c['kv_cache_bytes'] / report['n']:.0f}"]))
    if report["processes"] > 1:
        walls = ", ".join(f"{c.get('label', name)} {c['wall_seconds']:.2f}" for name, c in report["channels"].items())
        out += ["", f"Sharded over {report['processes']} processes: the stage seconds add up every process's; "
                f"wall seconds per channel (its slowest process): {walls}."]
    failed = [(c.get("label", name), e) for name, c in report["channels"].items() for e in c["errors"]]
    if failed:
        out += ["", "## Failed queries (counted as wrong)", "", md_row(["channel", "example", "rank", "error"]),
                md_row(["---"] * 4), *(md_row([name, str(e["index"]), str(e["rank"]), e["message"]]) for name, e in failed)]
    for channel in report.get("ablations", {}):
        header, rows = ablation_rows(report, channel)
        out += ["", f"## Does the message carry the query? ({channel} ablations)", "",
                md_row(header), md_row(["---"] * len(header)), *map(md_row, rows), "", ABLATION_NOTE]
    for channel, d in report.get("diagnostics", {}).items():
        out += ["", f"## Delta diagnostics ({channel})", "", *_diagnostics_lines(d)]
    return "\n".join(out) + "\n"


def provenance_lines(p: dict) -> list[str]:
    """Where the report came from, as markdown bullets."""
    lines = [f"- Recipe: `{p['recipe']['path']}` (resolved sha256 `{p['recipe']['sha256'][:12]}`)"]
    ckpt = p["checkpoint"]
    if ckpt is None:
        lines.append("- Checkpoint: none")
    else:
        steps = ", ".join(f"{c}: steps unknown" if s is None else f"{c} {s} steps" for c, s in ckpt["steps"].items())
        steps = steps or "no trained part"
        seed = "" if ckpt["seed"] is None else f"; trained with seed {ckpt['seed']}"
        lines.append(f"- Checkpoint: `{ckpt['path']}` ({steps}{seed})")
    limit = "" if p["limit"] is None else f", --limit {p['limit']}"
    lines.append(f"- Data: task {p['task']}, split {p['split']} ({p['split_size']} examples{limit}), seed {p['seed']}")
    lines.append(f"- Code: tflow {p['tflow']['version']}, commit {p['tflow']['commit'] or 'unknown (not a git checkout)'}")
    m = p["machine"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    lines.append(f"- Run: {p['date']} on {m['platform']}, CPU {m['cpu'] or 'unknown'}{gpu}, torch {m['torch']} "
                 f"with {m['torch_threads']} threads")
    return lines


def _diagnostics_lines(d: dict) -> list[str]:
    norms = sorted(n for n in d["row_norms"] if n is not None)
    bound = d["max_delta_norm"]
    guard = (f"max_delta_norm {bound:g}" if bound is not None else "no max_delta_norm set") + f", {d['refused']} refused"
    lines = [f"- Per-query delta norm over {d['queries']} queries: median {norms[len(norms) // 2]:.4g}, "
             f"min {norms[0]:.4g}, max {norms[-1]:.4g}; {guard}." if norms else
             f"- No finite delta among {d['queries']} queries; {guard}."]
    c = d["cosine"]
    if c is None:
        lines.append("- Cosine similarity between queries' deltas: fewer than two non-zero deltas to compare.")
    else:
        q = c["quantiles"]
        lines.append(f"- Cosine similarity between different queries' deltas ({c['queries']} queries): mean "
                     f"{c['mean']:.3f}, 5-95% {q['p5']:.3f} to {q['p95']:.3f}, min {c['min']:.3f}, max "
                     f"{c['max']:.3f}. Share of a delta's squared norm that is not the mean delta: "
                     f"{c['query_specific_share']:.3f}. Cosines near 1 say the deltas share one direction; "
                     "whether the rest carries the query, the ablations tell.")
    shares = ", ".join(f"{name} {n:.4g}" for name, n in d["sender_norms"].items() if n is not None)
    lines.append(f"- Mean norm of each sender's share: {shares or '—'}.")
    if d["norms"] is not None:
        grid = d["norms"]
        lines += ["", "Mean norm by layer and module kind:", "",
                  md_row(["layer", *grid["kinds"]]), md_row(["---"] * (len(grid["kinds"]) + 1))]
        lines += [md_row([str(layer), *("—" if v is None else f"{v:.3g}" for v in row)])
                  for layer, row in zip(grid["layers"], grid["mean_norm"], strict=True)]
    return lines


def md_row(cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def render_table(report: dict) -> str:
    """The channel table, its paired differences, then any ablation table, as terminal text (rich tables)."""
    tables = [(headers(COLUMNS, report["channels"]), table_rows(report), f"{report['task']} (n = {report['n']})")]
    paired = difference_rows(report)
    tables += [(*paired, "paired differences (points, 95% interval)")] if paired is not None else []
    tables += [(*ablation_rows(report, channel), f"{channel} ablations") for channel in report.get("ablations", {})]
    return terminal_tables(tables)


def terminal_tables(tables: list[tuple[Sequence[str], list[list[str]], str]]) -> str:
    """(columns, rows, title) tables as terminal text (rich tables, no colour)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=140, color_system=None)
    for columns, rows, title in tables:
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    return console.file.getvalue().rstrip("\n")
