"""Benchmarks measured side by side in one run: patched decode, sender encoding, generators, channels.

Models are randomly initialised at the named shape (timings need shapes, not trained weights) and
never end a turn early (their EOS tokens are suppressed), so every variant generates the same
number of tokens. The variants compared run in interleaved rounds whose order flips every round,
so drift on a shared machine hits them alike; a ratio is the median of its per-round ratios.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch

from tflow.backbones import tiny
from tflow.errors import BenchError
from tflow.evaluation.timing import (
    bench_hypernet,
    bench_model,
    hookless_twin,
    measure_channels,
    measure_decode,
    measure_encoding,
    measure_generators,
)

if TYPE_CHECKING:
    from rich.table import Table

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    "medium": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8, intermediate_size=2816),
    "qwen3-4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=9728),
}
GPU_SHAPES = ("qwen3-4b",)
QUERIES = ("What is the secret code of the city?", "The answer is 12. What is 12 plus 5?",
           "Read this document and pass on what matters.", "Which animal is the color of the city?")


@dataclass(frozen=True)
class Plan:
    """What one run measures: decode grid (batch, rank), lengths in tokens, queries, rounds per comparison.

    prompt_tokens and new_tokens size the decode runs; answer_tokens is what the receiver generates
    end to end on every channel (communicate's default budget is 64) and message_tokens what each
    sender writes on the text channel. The text channel runs `repeats` rounds; the cheap
    comparisons (decode, none vs weights) run `cheap_repeats`, since their ratios are the tight ones
    and a shared machine's noise is a few percent per round.
    """

    decode_grid: tuple[tuple[int, int], ...]
    prompt_tokens: int
    new_tokens: int
    answer_tokens: int
    message_tokens: int
    queries: int
    repeats: int
    cheap_repeats: int

    @classmethod
    def make(cls, quick: bool, message_tokens: int | None = None, repeats: int | None = None) -> Plan:
        rounds = repeats or (3 if quick else 5)
        if quick:
            plan = cls(((8, 8), (1, 8), (32, 8)), 32, 16, 64, 128, 2, rounds, 3 * rounds)
        else:
            plan = cls(tuple((b, r) for b in (1, 8, 32) for r in (4, 8, 16)), 64, 32, 128, 256, 4, rounds, rounds)
        return replace(plan, message_tokens=message_tokens or plan.message_tokens)


def run_bench(shape: str = "medium", quick: bool = False, *, device: str | None = None,
              force: bool = False, message_tokens: int | None = None, repeats: int | None = None,
              recipe=None) -> dict:
    """Measure decode, encoding, generator and channel costs on a random model of `shape`, or on
    the receiver backbone of `recipe` (a loaded Recipe: a real model, with its own tokenizer).

    Returns a JSON-ready dict with `patch_overhead` (patched/plain decode, batch 8, rank 8),
    `weights_vs_none` and `text_vs_weights` (end-to-end time ratios), the same for a basis delta
    (`patch_overhead_basis` at batch 8 and `patch_overhead_basis_batch32`, K = 16;
    `weights_vs_none_basis`), every generator's `message_bytes`, the raw timings and the machine.

    Raises:
        BenchError: unknown shape, or a GPU-sized shape on CPU without `force`.
    """
    if recipe is None and shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if recipe is None and shape in GPU_SHAPES and where.type == "cpu" and not force:
        raise BenchError(f"shape {shape!r} is sized for a GPU (bf16) and would take hours on CPU; "
                         "run it where CUDA is available, or force it (--force)")
    plan = Plan.make(quick, message_tokens, repeats)
    if recipe is not None:
        from tflow.backbones.loading import load_backbone

        section = recipe.receiver.model or recipe.model
        model, tok = load_backbone(section)
        model.generation_config.suppress_tokens = [tok.eos_token_id]
        shape, first = section.path, next(model.parameters())
        info = machine(first.device, first.dtype)
    else:
        dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
        info = machine(where, dtype)
        tok = tiny.tokenizer()
        model = bench_model(tok, SHAPES[shape], where, dtype)
    plain = hookless_twin(model)
    decode = [measure_decode(model, plain, len(tok), batch=b, rank=r, prompt_tokens=plan.prompt_tokens,
                             new_tokens=plan.new_tokens, repeats=plan.cheap_repeats) for b, r in plan.decode_grid]
    del plain
    queries = QUERIES[: plan.queries]
    encoding = measure_encoding(model, tok, queries, plan.repeats)
    generators = measure_generators(model, tok, queries, plan.repeats)
    channels = measure_channels(model, tok, queries, plan, {"weights": bench_hypernet(model, "param_tokens", 2),
                                                           "weights_basis": bench_hypernet(model, "basis", 2)})
    weights_s = channels["weights"]["seconds"]
    own_s = generators[next(iter(generators))]["seconds"]
    for g in generators.values():  # the share each kind would take in place of the channel's own generator
        g["share"] = g["seconds"] / (weights_s - own_s + g["seconds"])
    headline = next(d for d in decode if (d["batch"], d["rank"]) == (8, 8))
    wide = next((d for d in decode if (d["batch"], d["rank"]) == (32, 8)), None)
    info["load_average_1m_after"] = os.getloadavg()[0]
    return {
        "patch_overhead": headline["ratio"],
        "weights_vs_none": channels.pop("weights_vs_none"),
        "text_vs_weights": channels.pop("text_vs_weights"),
        "patch_overhead_basis": headline["basis_ratio"],
        "patch_overhead_batch32": wide and wide["ratio"],
        "patch_overhead_basis_batch32": wide and wide["basis_ratio"],
        "weights_vs_none_basis": channels.pop("weights_basis_vs_none"),
        "message_bytes": {kind: g["message_bytes"] for kind, g in generators.items()},
        "shape": shape, "quick": quick, "plan": asdict(plan),
        "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim", "intermediate_size")},
        "machine": info,
        "decode": decode, "encoding": encoding, "generator": generators, "channels": channels,
    }


def machine(device: torch.device, dtype: torch.dtype) -> dict:
    """Where the figures are measured: device, dtype, CPU threads, load average now, library versions."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "name": name, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
            "torch": torch.__version__, "transformers": transformers.__version__}


def table(result: dict) -> Table:
    """`run_bench`'s result as a rich Table: each timing beside its baseline, the headline ratios last."""
    from rich.table import Table

    m = result["machine"]
    out = Table(title=f"tflow bench: {result['shape']}{' --quick' if result['quick'] else ''} on {m['name']} "
                      f"({m['device']}, {m['dtype']}, {m['threads']} threads, torch {m['torch']})")
    for column in ("measure", "seconds", "baseline seconds", "ratio"):
        out.add_column(column, justify="left" if column == "measure" else "right")
    for d in result["decode"]:
        out.add_row(f"decode batch {d['batch']} rank {d['rank']}: patched vs plain", f"{d['patched_s']:.3f}",
                    f"{d['plain_s']:.3f}", f"{d['ratio']:.3f}")
        out.add_row(f"decode batch {d['batch']} basis K {d['k']}: patched vs plain", f"{d['basis_s']:.3f}",
                    f"{d['plain_s']:.3f}", f"{d['basis_ratio']:.3f}")
    e = result["encoding"]
    out.add_row(f"encode {e['senders']} senders: one forward each vs batched", f"{e['per_sender_s']:.3f}",
                f"{e['batched_s']:.3f}", f"{e['speedup']:.2f}")
    out.add_row("encode: whole prompts vs role prefixes reused", f"{e['full_prompts_s']:.3f}",
                f"{e['batched_s']:.3f}", f"{e['prefix_speedup']:.2f}")
    for kind, g in result["generator"].items():
        out.add_row(f"generator {kind}: share of weights end to end ({g['message_bytes']} message bytes)",
                    f"{g['seconds']:.3f}", "", f"{g['share']:.1%}")
    for channel, c in result["channels"].items():
        out.add_row(f"end to end {channel} ({c['receiver_tokens']} receiver tokens)", f"{c['seconds']:.3f}", "", "")
    out.add_section()
    for key in ("patch_overhead", "weights_vs_none", "text_vs_weights", "patch_overhead_basis",
                "patch_overhead_batch32", "patch_overhead_basis_batch32", "weights_vs_none_basis"):
        if result[key] is not None:
            out.add_row(key, "", "", f"{result[key]:.3f}")
    return out


