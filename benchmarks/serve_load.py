"""Load on `tflow serve`: AsyncOpenAI clients at 1, 8 and 32 concurrent, --max-batch 1 vs the default.

Each server runs as its own `tflow serve` process on a free loopback port, one after the other,
with a generator checkpoint made for the recipe's receiver in a temporary folder. Every client
sends its requests one after another (a closed loop); a level sends --requests requests in all.
Prints requests/s, receiver tokens/s, p50/p99 latency per level and server, then the two ratios
the issue targets: throughput at 32 concurrent vs --max-batch 1, and p99 at 32 concurrent vs the
single-request latency (p50 at 1 concurrent, same server).

Run: python benchmarks/serve_load.py [--set model.tiny.hidden_size=1024 --set model.tiny.num_layers=8]
     python benchmarks/serve_load.py --recipe recipes/smollm2-relay.yaml      # the real model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERIES = ["What is the secret code of Lisbon?", "one two three four five six seven eight nine", "Hi",
           "What is the answer to the question?", "number fact", "the final result is"]


def checkpoint(recipe: str, overrides: list[str], folder: Path) -> Path:
    """A generator checkpoint for the recipe's receiver (fresh weights: timing does not depend on them)."""
    import tflow
    from tflow.channels.weights import part
    from tflow.config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    part.save(tflow.load(loaded).receiver.generator, folder / "ckpt", loaded)
    return folder / "ckpt"


def start(recipe: str, overrides: list[str], ckpt: Path, max_batch: int | None, threads: int):
    """A `tflow serve` process on a free port; returns (process, base url)."""
    args = [sys.executable, "-m", "tflow.cli", "serve", recipe, "--checkpoint", str(ckpt), "--port", "0",
            "--threads", str(threads), *[a for o in overrides for a in ("--set", o)]]
    if max_batch is not None:
        args += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    for line in proc.stderr:
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].split("/v1")[0]
    raise SystemExit(f"tflow serve exited with {proc.wait()} before serving")


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests from `concurrency` closed-loop clients; latencies and throughput."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    latencies, tokens = [], 0
    todo = iter(range(requests))

    async def worker():
        nonlocal tokens
        for i in todo:
            began = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUERIES[i % len(QUERIES)]}], max_tokens=max_tokens)
            latencies.append(time.perf_counter() - began)
            tokens += reply.usage.completion_tokens

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - began
    await client.close()
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": requests, "seconds": seconds,
            "requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--model", default="tflow-weights", help="model id (channel) to load")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    parser.add_argument("--max-batch", type=int, help="--max-batch of the batching server (default: tflow serve's)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.max_batch is not None and args.max_batch < 2:
        parser.error("--max-batch must be at least 2: the batching server is compared with --max-batch 1")

    from tflow.config.recipe import load_recipe

    batching = "default" if args.max_batch is None else f"max-batch {args.max_batch}"
    built_here = load_recipe(args.recipe, args.overrides).model.tiny is not None
    with tempfile.TemporaryDirectory() as tmp:
        # A tiny recipe's model is built in the temporary folder; a real one loads from its path.
        overrides = [*([f"model.path={Path(tmp) / 'model'}"] if built_here else []), *args.overrides]
        ckpt = checkpoint(args.recipe, overrides, Path(tmp))
        results = {}
        for name, max_batch in (("max-batch 1", 1), (batching, args.max_batch)):
            proc, url = start(args.recipe, overrides, ckpt, max_batch, args.threads)
            try:
                asyncio.run(level(url, args.model, 4, 8, args.max_tokens))  # warm-up, not reported
                results[name] = [asyncio.run(level(url, args.model, c, args.requests, args.max_tokens))
                                 for c in levels]
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
    print(f"{'server':12} {'clients':>7} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:12} {r['concurrency']:7d} {r['requests_per_s']:8.2f} {r['tokens_per_s']:8.1f} "
                  f"{r['p50_s'] * 1e3:8.1f} {r['p99_s'] * 1e3:8.1f}")
    top = max(levels)
    by = {name: {r["concurrency"]: r for r in rows} for name, rows in results.items()}
    summary = {}
    if top in by[batching]:
        summary["throughput_vs_max_batch_1"] = by[batching][top]["requests_per_s"] / by["max-batch 1"][top]["requests_per_s"]
        print(f"throughput at {top} clients, {batching} vs --max-batch 1: {summary['throughput_vs_max_batch_1']:.2f}x "
              "(target >= 4x)")
    if 1 in by[batching] and top in by[batching]:
        summary["p99_vs_single"] = by[batching][top]["p99_s"] / by[batching][1]["p50_s"]
        print(f"p99 at {top} clients vs single-request latency ({batching} server): {summary['p99_vs_single']:.2f}x "
              "(target <= 2x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
