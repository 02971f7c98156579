"""Patched vs plain greedy decode, measured side by side in one run: per-row LoRA factors and a basis delta.

Shape: hidden 512, 4 layers, batch 8, rank 8 (basis K 16), all 7 linear types, 64 prompt + 32 new
tokens, CPU. Plain is a hookless twin on the same weight tensors (tflow.evaluation.timing.hookless_twin). Prints
per-variant median seconds and the median per-round patched/plain ratios.
Run: python benchmarks/patch_decode.py [--hidden 1024 --layers 8 --intermediate 2816 --heads 16 --kv-heads 8]
"""

from __future__ import annotations

import argparse
import json

import torch

from tflow.backbones import tiny
from tflow.evaluation.bench import machine
from tflow.evaluation.timing import bench_model, hookless_twin, measure_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--k", type=int, default=16, help="basis size K of the basis delta")
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 2 x hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="static cache and a torch.compile'd decode step for every variant (plain eager timed too)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tiny.tokenizer()
    shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads)
    if args.intermediate:
        shape["intermediate_size"] = args.intermediate
    model = bench_model(tok, shape, torch.device("cpu"), torch.float32)
    figures = measure_decode(model, hookless_twin(model), len(tok), batch=args.batch, rank=args.rank,
                             prompt_tokens=args.prompt, new_tokens=args.new, repeats=args.repeats, k=args.k,
                             compiled=args.compile)
    result = {"shape": vars(args), "plain_s": figures["plain_s"], "patched_s": figures["patched_s"],
              "basis_s": figures["basis_s"], "patch_overhead": figures["ratio"],
              "patch_overhead_basis": figures["basis_ratio"], "machine": machine(torch.device("cpu"), torch.float32)}
    print(f"plain   {result['plain_s'] * 1e3:8.1f} ms   (median of {args.repeats})")
    print(f"patched {result['patched_s'] * 1e3:8.1f} ms   rank {args.rank}")
    print(f"basis   {result['basis_s'] * 1e3:8.1f} ms   K {args.k}")
    if args.compile:
        result |= {key: figures[key] for key in ("compile_s", "plain_eager_s", "basis_vs_plain_eager")}
        print(f"plain, eager and dynamic cache {result['plain_eager_s'] * 1e3:8.1f} ms; basis compiled / that = "
              f"{result['basis_vs_plain_eager']:.3f}; first calls (compiling) "
              + ", ".join(f"{n} {s:.0f} s" for n, s in result["compile_s"].items()))
    print(f"patched/plain = {result['patch_overhead']:.3f}, basis/plain = {result['patch_overhead_basis']:.3f}"
          f"   ({torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
