"""The prepared GPU check: the paper's shape on one GPU in at most 8 minutes, offline, into one JSON.

    make gpu-check                                         # cuda, qwen3-4b, runs/gpu-check.json
    python benchmarks/gpu_check.py --device cpu --shape tiny --budget 900 --out /tmp/gpu-check.json

Stages, each a process of its own with a share of the budget (`STAGES`); one that fails or runs
out of time records why, and the check goes on with the next:

1. `gpu_tests`: the tests marked `gpu` (every channel trained, asked and evaluated in bfloat16 on
   CUDA; the patched forward against merged weights; no tensor on the default device). On a CPU
   run, the CPU cases of the same tests.
2. `build`: a backbone of the shape with random weights and the tiny BPE tokenizer, written
   locally in bfloat16 (no hub): Qwen3-4B's layout, 36 layers of width 2560.
3. `bench`: `tflow bench --quick` at the shape: patched decode against plain at batch 1, 8 and
   32 for a rank-8 LoRA delta (param_tokens') and a basis delta (basis'), weights against none
   end to end for both generators, and text against weights.
4. `train`: `tflow train recipes/qwen3x3.yaml` on that backbone (relay data, bf16-mixed,
   gradient checkpointing) for 50 steps; `train_fsdp`: the same on Lightning's FSDP strategy on
   one device (skipped without CUDA: Lightning's FSDP runs on GPUs only).
5. `serve`: `benchmarks/serve_load.py` on that backbone at 1, 8 and 32 concurrent clients (on a CPU
   smoke run, 1 and 4 clients and 8 requests a level, to fit its share).

The JSON holds the card's name, each stage's status, wall seconds, budget and figures, the
headline figures beside their targets (docs/performance.md), and the whole run's wall seconds.
It is rewritten after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tflow.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

STAGES = {"gpu_tests": 0.16, "build": 0.09, "bench": 0.25, "train": 0.13, "train_fsdp": 0.11, "serve": 0.21}
"""Each stage's share of --budget; the rest is start-up and slack."""
SHAPES = {
    "qwen3-4b": {"backbone": {"max_positions": 4096}, "steps": 50, "overrides": []},
    "tiny": {"backbone": {}, "steps": 10, "overrides": ["generator.d_model=128", "generator.heads=4"]},
}
"""Per shape: extra backbone settings (besides `tflow bench`'s shape), training steps, and recipe
overrides (the tiny shape's smaller generator keeps a CPU run to minutes)."""
TARGETS = {"patch_overhead_basis_batch32": ("<=", 1.05), "weights_vs_none": ("<=", 1.10),
           "throughput_vs_max_batch_1": (">=", 8.0), "p99_vs_single": ("<=", 2.0)}
"""The GPU targets of docs/performance.md: basis patched decode against plain at batch 32, weights
against none end to end, and serving at 32 concurrent clients against --max-batch 1 and against a
single request."""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command: list[str], log: Path, seconds: float) -> int | None:
    """Run `command` with its output in `log`; its exit code, or None when it ran past `seconds`
    (then it and every process it started are killed)."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def stage(name: str, command: list[str] | str, work: Path, seconds: float, read=None) -> dict:
    """Run one stage: {status: ok | failed | timed out | skipped, seconds, budget_s, figures | error}.

    A str `command` is the reason the stage is skipped here; `read()` gives an ok stage's figures.
    """
    if isinstance(command, str):
        return {"status": "skipped", "seconds": 0.0, "budget_s": round(seconds), "reason": command}
    log = work / f"{name}.log"
    began = time.perf_counter()
    code = run(command, log, seconds)
    record = {"seconds": round(time.perf_counter() - began, 1), "budget_s": round(seconds), "log": str(log),
              "command": " ".join(command)}
    if code is None:
        return {"status": "timed out", **record, "error": f"ran past its {seconds:.0f} s; last: {last_line(log)}"}
    if code != 0:
        return {"status": "failed", **record, "error": f"exit {code}: {last_line(log)}"}
    try:
        return {"status": "ok", **record, "figures": read() if read else {"last": last_line(log)}}
    except (OSError, ValueError, KeyError) as err:
        return {"status": "failed", **record, "error": f"ran, but its figures could not be read: {err}"}


def tflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "tflow.cli", *args]


def plan(args, work: Path) -> dict:
    """{stage: (command or reason to skip, reader of its figures)} for this device and shape."""
    cuda = args.device.startswith("cuda")
    shape = SHAPES[args.shape]
    model = work / "model"
    recipe = ["recipes/qwen3x3.yaml", f"model.path={model}", "model.tiny=null", f"model.device={args.device}",
              *shape["overrides"]]
    marker = "gpu" if cuda else "not gpu and not slow"
    tests = ["tests/unit/training/test_bfloat16.py", "tests/unit/channels/test_default_device.py"]
    run_train = ["train", *recipe, "data.task=relay", "data.relay.n_train=256", "data.relay.n_val=8",
                 "data.relay.n_test=8", f"train.max_steps={shape['steps']}", "train.accumulate=1",
                 f"train.val_every={shape['steps']}", "train.val_batches=2", "train.accelerator=auto", "--no-progress"]
    serve = [sys.executable, "benchmarks/serve_load.py", "--recipe", "recipes/qwen3x3.yaml",
             *[a for o in recipe[1:] for a in ("--set", o)],
             *(["--concurrency", "1,8,32", "--requests", "32"] if cuda else ["--concurrency", "1,4", "--requests", "8"]),
             "--max-tokens", "16", "--json", str(work / "serve.json")]
    return {
        "gpu_tests": ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                       *([] if cuda else tests)], lambda: {"summary": last_line(work / "gpu_tests.log")}),
        "build": ([sys.executable, __file__, "--build", str(model), "--device", args.device, "--shape", args.shape],
                  lambda: json.loads(last_line(work / "build.log"))),
        "bench": (tflow("bench", "--shape", args.shape, "--quick", "--device", args.device,
                        *([] if cuda else ["--threads", "1"]),  # an oversubscribed CPU times noise
                        "--json", str(work / "bench.json")), lambda: bench_figures(work / "bench.json")),
        "train": (tflow(*run_train, f"train.out_dir={work / 'train'}"), lambda: train_figures(work / "train")),
        "train_fsdp": (tflow(*run_train, "train.strategy=fsdp", f"train.out_dir={work / 'train-fsdp'}") if cuda
                       else "Lightning's FSDP strategy runs on CUDA devices only",
                       lambda: train_figures(work / "train-fsdp")),
        "serve": (serve, lambda: serve_figures(work / "serve.json")),
    }


def bench_figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    keys = ("patch_overhead", "patch_overhead_basis", "patch_overhead_batch32", "patch_overhead_basis_batch32",
            "weights_vs_none", "weights_vs_none_basis", "text_vs_weights")
    return {**{k: result[k] for k in keys}, "machine": result["machine"],
            "decode": [{k: d[k] for k in ("batch", "rank", "k", "plain_s", "ratio", "basis_ratio")}
                       for d in result["decode"]],
            "channels_s": {name: c["seconds"] for name, c in result["channels"].items()}}


def train_figures(out_dir: Path) -> dict:
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    losses = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    steps = max((int(r["step"]) for r in rows), default=0)
    return {"val_loss": losses, "last_step": steps, "part": sorted(p.name for p in out_dir.iterdir())}


def serve_figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    levels = {name: [{k: r[k] for k in ("concurrency", "requests_per_s", "tokens_per_s", "p50_s", "p99_s")}
                     for r in rows] for name, rows in result["results"].items()}
    return {"levels": levels, **{k: result[k] for k in ("throughput_vs_max_batch_1", "p99_vs_single") if k in result}}


def headline(stages: dict) -> dict:
    """The figures the targets name, each with its target and whether it meets it."""
    found = {**stages.get("bench", {}).get("figures", {}), **stages.get("serve", {}).get("figures", {})}
    out = {}
    for key, (sense, bound) in TARGETS.items():
        value = found.get(key)
        meets = None if value is None else (value <= bound if sense == "<=" else value >= bound)
        out[key] = {"value": value, "target": f"{sense} {bound}", "meets": meets}
    return out


def card(device: str) -> dict:
    """The device's name (the GPU's, or the CPU model), memory and the library versions."""
    import torch
    import transformers

    from tflow.evaluation.provenance import cpu_model

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda}
    if device.startswith("cuda") and torch.cuda.is_available():
        at = torch.device(device)
        props = torch.cuda.get_device_properties(at)
        return {**info, "name": torch.cuda.get_device_name(at), "memory_gib": round(props.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(including_emulation=False)}
    return {**info, "name": cpu_model() or "cpu", "cpus": os.cpu_count()}


def build(folder: Path, device: str, shape: str) -> None:
    """Write a random bfloat16 backbone of `shape` (built on `device`, where initialising is fast)."""
    import torch

    from tflow.backbones import tiny
    from tflow.evaluation.bench import SHAPES as BENCH_SHAPES

    began = time.perf_counter()
    with torch.device(device):
        tiny.build(folder, dtype=torch.bfloat16, **BENCH_SHAPES[shape], **SHAPES[shape]["backbone"])
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(json.dumps({"path": str(folder), "bytes": size, "seconds": round(time.perf_counter() - began, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--shape", default="qwen3-4b", choices=list(SHAPES))
    parser.add_argument("--out", default="runs/gpu-check.json", help="the JSON to write")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--work", help="folder for the backbone, logs and runs [default: a temporary one]")
    parser.add_argument("--build", metavar="FOLDER", help=argparse.SUPPRESS)  # the build stage's own process
    args = parser.parse_args()
    if args.build:
        return build(Path(args.build), args.device, args.shape)
    chosen = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    began = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        report = {"card": card(args.device), "shape": args.shape, "budget_s": args.budget, "stages": {}}
        for name, (command, read) in plan(args, work).items():
            if name not in chosen:
                continue
            left = args.budget - (time.perf_counter() - began)
            report["stages"][name] = record = stage(name, command, work, min(STAGES[name] * args.budget, left), read)
            print(f"{name}: {record['status']} in {record['seconds']} s"
                  f"{': ' + record.get('error', record.get('reason', '')) if record['status'] != 'ok' else ''}",
                  flush=True)
            report.update(headline=headline(report["stages"]), wall_s=round(time.perf_counter() - began, 1))
            atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']} s on {report['card']['name']})")


if __name__ == "__main__":
    main()
