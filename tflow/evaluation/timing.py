"""The measurements `tflow bench` makes, each side by side in one run: patched against plain
decode, sender encoding, each generator kind, and the channels end to end.

Variants compared run in interleaved rounds whose order flips every round, so drift on a shared
machine hits them alike; a ratio is the median of its per-round ratios.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import generators as generator_kinds
import tflow
from tflow.agents.agent import Receiver, Sender
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.backbones.families import ReceiverSpec
from tflow.channels.latent.links import Links
from tflow.channels.weights.hypernetwork import Hypernetwork
from tflow.lora.basis import BasisDelta
from tflow.lora.delta import LoRADelta
from tflow.lora.patching import patched
from tflow.lora.receiver_lora import ReceiverLoRA

BASIS_K = 16  # the basis size the basis generator and the basis decode runs use
LATENT_STEPS = 10  # per sender, on the kv and latent channels (the kv default)
ROLES = ("You are a strategist: say how to approach the task, not the answer.",
         "You are a knowledge extractor: list the facts and constraints, do not solve.",
         "You are a critic: point out what could go wrong.")


def bench_model(tok, shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random Qwen3-layout model of `shape` on `device` whose generate() never stops before its budget."""
    with torch.device(device):
        model = tiny.model(tok, dtype=dtype, max_positions=4096, **shape)
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    return model


def hookless_twin(model: nn.Module) -> nn.Module:
    """A second model object on the very same weight tensors, never patched, so without hooks.

    Sharing the memory matters: two copies of the same weights decode at speeds a few percent
    apart on CPU (allocation and page layout), a bias that a patched/plain ratio between a model
    and its deepcopy would carry for the whole run.
    """
    with torch.device(next(model.parameters()).device):
        twin = type(model)(model.config)
    state = model.state_dict()
    twin.load_state_dict(state, assign=True)
    twin.tie_weights()  # assigning gave lm_head its own tensor object on the embedding's memory
    for name, buffer in model.named_buffers():  # the non-persistent ones (rotary frequencies) too
        owner, _, leaf = name.rpartition(".")
        twin.get_submodule(owner).register_buffer(leaf, buffer, persistent=name in state)
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin.eval()


def measure_decode(model: nn.Module, plain: nn.Module, vocab: int, *, batch: int, rank: int,
                   prompt_tokens: int, new_tokens: int, repeats: int, k: int = BASIS_K,
                   compiled: bool = False) -> dict:
    """Greedy generate() with a random delta on every targeted linear of `model` vs `plain`, its
    hookless twin: per-row LoRA factors of `rank`, and cores on a shared basis of size `k`.

    `compiled`: every variant decodes with a static cache and a torch.compile'd decode step
    (transformers' own compiled generate, prefill eager), and `plain_eager_s` times the plain twin
    as it runs by default (eager, dynamic cache), so the compiled figures can be read against it;
    `compile_s` is each variant's first call, which compiles its graph.
    """
    first = next(model.parameters())
    g = torch.Generator().manual_seed(0)  # drawn on the host, so every device measures the same numbers
    modules = ReceiverSpec.from_model(model).modules
    host = functools.partial(torch.randn, generator=g, device="cpu")  # cpu: the seeded host generator's draws
    delta = LoRADelta({m.name: (host(batch, rank, m.in_features) * 0.02, host(batch, m.out_features, rank) * 0.02)
                       for m in modules}, scale=2.0).to(first.device)
    basis = BasisDelta({m.name: (host(k, m.in_features) * 0.02, host(m.out_features, k) * 0.02) for m in modules},
                       {m.name: host(batch, k, k) for m in modules}, scale=2.0).to(first.device)
    ids = torch.randint(3, vocab, (batch, prompt_tokens), generator=g, device="cpu").to(first.device)  # cpu: as above
    eager = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    settings = {**eager, "cache_implementation": "static", "compile_config": _cpu_compile()} if compiled else eager

    def run_plain(settings: dict) -> None:
        with torch.no_grad():
            plain.generate(**settings)

    def run_patched(d) -> None:
        with patched(model, d), torch.no_grad():
            model.generate(**settings)

    variants = {"plain": functools.partial(run_plain, settings), "patched": functools.partial(run_patched, delta),
                "basis": functools.partial(run_patched, basis)}
    if compiled:
        variants["plain_eager"] = functools.partial(run_plain, eager)
    with patched(model, delta):  # installs the hooks, which drops compiled graphs: before any is traced
        pass
    first = {name: _timed(fn) for name, fn in variants.items()}
    times = interleaved(variants, repeats, warmup=False)
    figures = {"batch": batch, "rank": rank, "k": k, "plain_s": statistics.median(times["plain"]),
               "patched_s": statistics.median(times["patched"]), "ratio": ratio(times["patched"], times["plain"]),
               "basis_s": statistics.median(times["basis"]), "basis_ratio": ratio(times["basis"], times["plain"]),
               "round_seconds": times}
    if compiled:
        figures |= {"compile_s": first, "plain_eager_s": statistics.median(times["plain_eager"]),
                    "basis_vs_plain_eager": ratio(times["basis"], times["plain_eager"])}
    return figures


def _cpu_compile():
    """transformers' compiled decode step, on CPU too (it compiles only on accelerators unless told)."""
    from transformers import CompileConfig

    config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
    config._compile_all_devices = True
    return config


def measure_encoding(model: nn.Module, tok, queries: Sequence[str], repeats: int) -> dict:
    """Three senders' states: one batched forward with role prefixes reused (tflow.agents.encoding.encode)
    vs one forward per sender, and vs the whole prompts prefilled (reuse_prefixes=False)."""
    senders = bench_senders(model, tok, 3)
    times = interleaved({"batched": lambda: encode(senders, queries),
                         "per_sender": lambda: [encode([s], queries) for s in senders],
                         "full_prompts": lambda: encode(senders, queries, reuse_prefixes=False)}, repeats)
    return {"senders": len(senders), "queries": len(queries), "batched_s": statistics.median(times["batched"]),
            "per_sender_s": statistics.median(times["per_sender"]),
            "full_prompts_s": statistics.median(times["full_prompts"]),
            "speedup": ratio(times["per_sender"], times["batched"]),
            "prefix_speedup": ratio(times["full_prompts"], times["batched"])}


def measure_generators(model: nn.Module, tok, queries: Sequence[str], repeats: int) -> dict[str, dict]:
    """Per generator kind: seconds of the weights channel's generator stage (aggregation, generator,
    fusion) and the bytes of one query's fused delta, the message (two senders)."""
    states = encode(bench_senders(model, tok, 2), queries)
    nets = {kind: bench_hypernet(model, kind, 2) for kind in generator_kinds.available()}

    def forward(net: Hypernetwork):
        with torch.no_grad():
            return net(states)

    times = interleaved({kind: functools.partial(forward, net) for kind, net in nets.items()}, repeats)
    return {kind: {"seconds": statistics.median(t), "message_bytes": forward(nets[kind]).num_bytes // len(queries)}
            for kind, t in times.items()}


def measure_channels(model: nn.Module, tok, queries: Sequence[str], plan,
                     generators: dict[str, Hypernetwork]) -> dict:
    """End to end tflow.communicate per channel with two senders, every receiver generating the same length.

    `generators` names the weight-channel variants: {"weights": hypernetwork, "weights_basis": ...};
    each runs the weights channel with its own generator. kv runs with a LoRA on every linear (its
    hooks cost what a trained one costs) and latent with fresh links, both with `LATENT_STEPS`
    latent steps per sender.
    """
    senders = bench_senders(model, tok, 2)
    receiver = Receiver(model, tok, "You are the executor.", name="executor")
    device = next(model.parameters()).device
    receiver.kv_lora = ReceiverLoRA(ReceiverSpec.from_model(model), rank=8, alpha=16).to(device)
    receiver.links = Links([model.config.hidden_size] * 2, model.config.hidden_size).to(device)
    replies: dict[str, list] = {}

    def run(variant: str) -> None:
        receiver.generator = generators.get(variant)
        options = {"text": {"message_tokens": plan.message_tokens}, "kv": {"latent_steps": LATENT_STEPS},
                   "latent": {"latent_steps": LATENT_STEPS}}.get(variant, {})
        replies[variant] = tflow.communicate(senders, receiver, list(queries),
                                             channel="weights" if variant in generators else variant,
                                             max_new_tokens=plan.answer_tokens, **options)

    # No warm-up round: the model is warm from the decode runs, and one text round costs a lot.
    cheap = ("none", *generators, "kv", "latent")
    variants = {ch: functools.partial(run, ch) for ch in ("none", "text", *generators, "kv", "latent")}
    times = interleaved(variants, plan.repeats, warmup=False)
    more = interleaved({ch: variants[ch] for ch in cheap}, plan.cheap_repeats - plan.repeats, warmup=False)
    for ch, t in more.items():
        times[ch] += t
    out: dict = {ch: {"seconds": statistics.median(t), "round_seconds": t,
                      "last_round_stages": dict(replies[ch][0].timings),
                      "receiver_tokens": sum(r.usage.by_agent[receiver.name].generated_tokens for r in replies[ch]),
                      "total_tokens": sum(r.usage.total_tokens for r in replies[ch])} for ch, t in times.items()}
    for variant in generators:
        out[f"{variant}_vs_none"] = ratio(times[variant], times["none"])
    out["text_vs_weights"] = ratio(times["text"], times["weights"][:plan.repeats])
    return out


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Wall seconds of every variant in each of `repeats` rounds (after a warm-up call each); order flips per round."""
    for fn in variants.values() if warmup else ():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_timed(variants[name]))
    return times


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios numerator[i] / denominator[i]."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_senders(model: nn.Module, tok, n: int) -> list[Sender]:
    return [Sender(model, tok, ROLES[i], name=f"sender{i}") for i in range(n)]


def bench_hypernet(model: nn.Module, kind: str, num_senders: int) -> Hypernetwork:
    """A fresh generator of `kind` (d_model 128) for `model`, on its device: rank 4 a sender (fused
    rank 8 for two), or a basis of size BASIS_K (the senders' cores add: rank K)."""
    cfg = model.config
    rank = BASIS_K if kind == "basis" else 4
    net = Hypernetwork(ReceiverSpec.from_model(model), {"kind": kind, "rank": rank, "d_model": 128, "depth": 2, "heads": 4},
                       num_senders, cfg.num_hidden_layers + 1, cfg.hidden_size)
    return net.to(next(model.parameters()).device).eval()
