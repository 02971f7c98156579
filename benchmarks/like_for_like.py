"""One seed of the SmolLM2 like-for-like table: every trained part, then the four evals, one at a time.

    python benchmarks/like_for_like.py TASK SEED OUT [--dry-run]

TASK is `relay` or `category`. Trains each channel of `CHANNELS[TASK]` into OUT/parts (100 steps at batch 8, lr 1e-3, the recipe's validation split), then runs the task's four evals
of the test split into OUT/eval-A … OUT/eval-D, in the same groups and with the same recipe keys
as seed 0's reports in docs/reports, so that `tflow aggregate` pools them with seeds 0–2. A step
that exists already (a part's `steps.json`, an eval's report.json) is skipped, so an interrupted
queue resumes. Each step's wall seconds and peak RSS are appended to OUT/steps.jsonl; its output
goes to OUT/logs/. `--dry-run` prints the commands instead. Run it alone: a second busy process
doubles every timing on 2 cores.

The category task has no weights training here: its weights row is the perceiver distilled from
a context-trained teacher (recipes/smollm2-category-distill.yaml, docs/results.md), and a copy
head cannot name a category that no document holds.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tflow.training.loop import STEPS_FILE, run_dir

TFLOW = str(Path(sys.executable).with_name("tflow"))  # the CLI of this environment
TRAIN = ("train.max_steps=100", "train.val_every=100", "train.val_batches=4")
CHANNELS = {"relay": ("none", "weights", "kv", "context", "latent", "text"),
            "category": ("none", "kv", "context", "latent", "text")}


def evals(task: str, parts: Path, seed: int) -> dict[str, list[str]]:
    """Seed 0's eval groups for `task`: name -> the `tflow eval` arguments before --checkpoint."""
    base, own = f"recipes/smollm2-{task}.yaml", str(parts / "recipe.yaml")
    if task == "relay":  # as docs/reports/smollm2-relay-s0-{A,B,C,ablations}
        return {"A": [base, f"seed={seed}", "--channels", "none,context,weights"],
                "B": [base, f"seed={seed}", "--channels", "none,kv,latent", "--ablations", "shuffled,static"],
                "C": [base, f"seed={seed}", "--channels", "none,text"],
                "D": [own, "train.channel=text", "--channels", "none,weights",
                      "--ablations", "shuffled,static,copy-head,trunk"]}
    # as docs/reports/smollm2-category-s0-{A,B,C,D}: each later group on the run's recipe with the
    # channel it was trained last for
    return {"A": [base, f"seed={seed}", "--channels", "none,context"],
            "B": [own, "train.channel=kv", "--channels", "none,kv", "--ablations", "shuffled,static"],
            "C": [own, "train.channel=text", "--channels", "none,text"],
            "D": [own, "train.channel=latent", "--channels", "none,latent", "--ablations", "shuffled,static"]}


def queue(task: str, seed: int, out: Path) -> list[tuple[str, list[str], Path]]:
    """(name, command, the file that says it is done) for every step, in order."""
    parts = out / "parts"
    steps = []
    for channel in CHANNELS[task]:
        done = run_dir(parts, channel) / STEPS_FILE
        steps.append((f"train-{channel}", [TFLOW, "train", f"recipes/smollm2-{task}.yaml", f"seed={seed}", *TRAIN,
                                           f"train.out_dir={parts}", f"train.channel={channel}"], done))
    for name, args in evals(task, parts, seed).items():
        steps.append((f"eval-{name}", [TFLOW, "eval", *args, "--checkpoint", str(parts), "--batch-size", "16",
                                       "--no-progress", "--out", str(out / f"eval-{name}")],
                      out / f"eval-{name}" / "report.json"))
    return steps


def run(name: str, command: list[str], out: Path) -> None:
    """Run one step with its output in OUT/logs/NAME.log; append its wall time and peak RSS."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / "logs" / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    record = {"step": name, "rc": code, "wall_s": round(time.monotonic() - start, 1),
              "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    if code != 0:
        sys.exit(f"{name} failed (exit {code}); its output is in {out / 'logs' / f'{name}.log'}")


def main(argv: list[str]) -> None:
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if len(argv) != 3 or argv[0] not in CHANNELS or not argv[1].isdigit():
        sys.exit("usage: python benchmarks/like_for_like.py relay|category SEED OUT [--dry-run]")
    task, seed, out = argv[0], int(argv[1]), Path(argv[2])
    for name, command, done in queue(task, seed, out):
        if done.exists():
            print(f"{name}: done already ({done})")
        elif dry:
            print(shlex.join(command))
        else:
            run(name, command, out)


if __name__ == "__main__":
    main(sys.argv[1:])
