"""Accuracy and cost of the kv channel against its latent steps, beside none and text (a measurement).

    python benchmarks/latent_steps.py RECIPE [N] [STEPS ...] [--checkpoint DIR]

Runs the recipe's team on N relay queries (default 40, generated with seed 11, as
tests/test_real_model.py does, with each sender's document) in batches of 4: none, text, then kv
at each latent-step count (default 0 5 10 20 40). Without a checkpoint the kv LoRA is fresh, so
kv is LatentMAS; with one, its trained LoRA is used at every step count (it was trained at the
recipe's kv.latent_steps). Prints one JSON line per run: accuracy, processed tokens per query,
message bytes per query, and wall seconds (inflated by whatever else runs on the machine).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import tflow
from tflow.recipe import load_recipe
from tflow.tasks import relay


def main(argv: list[str]) -> None:
    checkpoint = None
    if "--checkpoint" in argv:
        at = argv.index("--checkpoint")
        checkpoint, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    recipe = load_recipe(argv[0])
    n = int(argv[1]) if len(argv) > 1 else 40
    steps = [int(s) for s in argv[2:]] or [0, 5, 10, 20, 40]
    team = tflow.load(recipe, checkpoint)
    examples = relay.generate(n, seed=11, senders=tuple(s.name for s in recipe.senders), format=recipe.data.relay.format)
    task = relay.Relay()
    runs = [("none", {}), ("text", {})] + [("kv", {"latent_steps": k}) for k in steps]
    for channel, options in runs:
        began, replies = time.perf_counter(), []
        for i in range(0, n, 4):
            batch = examples[i:i + 4]
            replies += team.communicate([task.prompt(e) for e in batch], channel=channel,
                                        contexts=[e.contexts for e in batch], **options)
        print(json.dumps({"channel": team.label(channel), **options, "n": n,
                          "accuracy": sum(task.score(r.text, e) for r, e in zip(replies, examples, strict=True)) / n,
                          "tokens_per_query": sum(r.usage.total_tokens for r in replies) / n,
                          "message_bytes_per_query": sum(r.message_bytes for r in replies) / n,
                          "seconds": round(time.perf_counter() - began, 1)}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
