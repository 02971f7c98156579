"""Patched vs plain greedy decode, measured side by side in one run (issue: patching core).

Shape: hidden 512, 4 layers, batch 8, rank 8, all 7 linear types, 64 prompt + 32 new tokens, CPU.
Prints per-variant median seconds and the patched/plain ratio. Run: python benchmarks/patch_decode.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tflow import LoRADelta, ReceiverSpec, patched, tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = tiny.tokenizer()
    model = tiny.model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4)
    spec = ReceiverSpec.from_model(model)
    delta = LoRADelta({m.name: (torch.randn(args.batch, args.rank, m.in_features) * 0.02,
                                torch.randn(args.batch, m.out_features, args.rank) * 0.02)
                       for m in spec.modules}, scale=2.0)
    ids = torch.randint(3, len(tok), (args.batch, args.prompt))
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id)

    def plain():
        with torch.no_grad():
            model.generate(ids, **gen)

    def patch():
        with patched(model, delta), torch.no_grad():
            model.generate(ids, **gen)

    times = {"plain": [], "patched": []}
    plain(), patch()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, fn in (("plain", plain), ("patched", patch)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"shape": vars(args), "plain_s": med["plain"], "patched_s": med["patched"],
              "patch_overhead": med["patched"] / med["plain"], "threads": torch.get_num_threads()}
    print(f"plain   {med['plain'] * 1e3:8.1f} ms   (median of {args.repeats})")
    print(f"patched {med['patched'] * 1e3:8.1f} ms")
    print(f"patched/plain = {result['patch_overhead']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
