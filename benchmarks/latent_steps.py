"""Accuracy and cost of the kv and latent channels against their latent steps, beside none and text.

    python benchmarks/latent_steps.py RECIPE [N] [STEPS ...] [--checkpoint DIR] [--held-out] [--plot PNG]

Runs the recipe's team on N relay queries (default 40) in batches of 4: none, text, then kv at
each latent-step count (default 0 5 10 20 40), then latent at each count if the checkpoint has
trained links. The queries are generated with seed 11, as tests/real/test_real_model.py does, with
each sender's document; `--held-out` takes the first N of the recipe's held-out split instead
(the facts `tflow eval` and `tflow demo` score). Without a checkpoint the kv LoRA is fresh, so
kv is LatentMAS; with one, its trained LoRA (and links) run at every step count (they were
trained at the recipe's kv/latent.latent_steps). Prints one JSON line per run: accuracy,
processed tokens per query, message bytes per query, and wall seconds (inflated by whatever else
runs on the machine); `--plot` also draws accuracy against latent steps, none and text as lines.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import tflow
from tflow.config.recipe import load_recipe
from tflow.io import atomic_write
from tflow.tasks import relay
from tflow.training.data import eval_examples


def option(argv: list[str], flag: str, takes_value: bool = True) -> tuple[str | bool | None, list[str]]:
    """The value of `flag` (or whether it is there) and argv without it."""
    if flag not in argv:
        return (None if takes_value else False), argv
    at = argv.index(flag)
    if not takes_value:
        return True, argv[:at] + argv[at + 1:]
    return argv[at + 1], argv[:at] + argv[at + 2:]


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against latent steps per channel, none and text as horizontal lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["channel"] for r in rows if "latent_steps" in r):
        points = [(r["latent_steps"], 100 * r["accuracy"]) for r in rows if r["channel"] == name]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    for r in rows:
        if "latent_steps" not in r:
            ax.axhline(100 * r["accuracy"], linestyle="--", color="grey" if r["channel"] == "none" else "black",
                       label=r["channel"])
    ax.set(xlabel="latent steps per sender", ylabel=f"accuracy (%), {rows[0]['n']} queries", ylim=(-2, 102))
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv: list[str]) -> None:
    checkpoint, argv = option(argv, "--checkpoint")
    held_out, argv = option(argv, "--held-out", takes_value=False)
    png, argv = option(argv, "--plot")
    recipe = load_recipe(argv[0])
    n = int(argv[1]) if len(argv) > 1 else 40
    steps = [int(s) for s in argv[2:]] or [0, 5, 10, 20, 40]
    team = tflow.load(recipe, checkpoint)
    task = relay.Relay()
    examples = (eval_examples(recipe, task, "test", n) if held_out else
                relay.generate(n, seed=11, senders=tuple(s.name for s in recipe.senders), format=recipe.data.relay.format))
    n = len(examples)
    runs = [("none", {}), ("text", {})] + [("kv", {"latent_steps": k}) for k in steps]
    if "latent" in team.trained:
        runs += [("latent", {"latent_steps": k}) for k in steps]
    rows = []
    for channel, options in runs:
        began, replies = time.perf_counter(), []
        for i in range(0, n, 4):
            batch = examples[i:i + 4]
            replies += team.communicate([task.prompt(e) for e in batch], channel=channel,
                                        contexts=[e.contexts for e in batch], **options)
        rows.append({"channel": team.label(channel), **options, "n": n,
                     "accuracy": sum(task.score(r.text, e) for r, e in zip(replies, examples, strict=True)) / n,
                     "tokens_per_query": sum(r.usage.processed_tokens for r in replies) / n,
                     "message_bytes_per_query": sum(r.message_bytes for r in replies) / n,
                     "seconds": round(time.perf_counter() - began, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if png:
        plot(rows, png)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
