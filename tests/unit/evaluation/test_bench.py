"""tflow bench: the quick benchmark's figures, refused shapes, and the hookless twin it times against."""

import math

import pytest
import torch
from conftest import random_delta

from tflow.errors import BenchError
from tflow.evaluation.bench import SHAPES, run_bench, table
from tflow.evaluation.timing import bench_model, hookless_twin
from tflow.lora.patching import patched


def test_quick_bench_of_a_recipe_reports_every_figure_as_a_positive_number(tmp_path):
    # A recipe's own receiver backbone (here the tiny recipe's); `--shape tiny` is the same model
    # built by bench_model, covered below.
    from tflow.config.recipe import load_recipe

    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path / 'tiny'}"])
    result = run_bench(quick=True, repeats=1, recipe=recipe)
    assert result["shape"] == str(tmp_path / "tiny")
    assert result["model"]["hidden_size"] == recipe.model.tiny.hidden_size
    headline = ("patch_overhead", "weights_vs_none", "text_vs_weights", "patch_overhead_basis",
                "patch_overhead_batch32", "patch_overhead_basis_batch32", "weights_vs_none_basis")
    figures = [result[key] for key in headline]
    figures += [v for d in result["decode"] for k, v in d.items() if k.endswith(("_s", "ratio"))]
    figures += [result["encoding"][k] for k in ("batched_s", "per_sender_s", "speedup")]
    figures += [float(v) for g in result["generator"].values() for v in g.values()]
    figures += [c["seconds"] for c in result["channels"].values()]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in figures), figures
    assert {(d["batch"], d["rank"], d["k"]) for d in result["decode"]} == {(8, 8, 16), (1, 8, 16), (32, 8, 16)}
    assert set(result["channels"]) == {"none", "text", "weights", "weights_basis", "kv", "latent"}
    assert set(result["generator"]) == {"param_tokens", "mlp", "basis", "perceiver"}
    # A query's fused message from two senders, float32: rank 2 x 4 factors (2 x 8 with the perceiver's
    # bias LoRA), or one 16 x 16 core, a module.
    m = result["model"]
    h, q, kv, ff = m["hidden_size"], m["num_attention_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"], \
        m["intermediate_size"]
    sides = (h + q) * 2 + (h + kv) * 2 + (h + ff) * 3  # q, o; k, v; gate, up, down
    layers = m["num_hidden_layers"]
    assert result["message_bytes"] == {"param_tokens": 4 * 8 * sides * layers, "mlp": 4 * 8 * sides * layers,
                                       "basis": 4 * 16 * 16 * 7 * layers, "perceiver": 4 * 16 * sides * layers}
    tokens = {c["receiver_tokens"] for c in result["channels"].values()}
    assert tokens == {result["plan"]["answer_tokens"] * result["plan"]["queries"]}  # equal lengths, forced
    assert {"device", "threads", "torch"} <= set(result["machine"])
    assert table(result).row_count > 0


def test_unknown_shape_and_gpu_shape_on_cpu_are_refused():
    with pytest.raises(BenchError, match="unknown shape 'huge'"):
        run_bench("huge", quick=True)
    with pytest.raises(BenchError, match="sized for a GPU"):
        run_bench("qwen3-4b", quick=True, device="cpu")


def test_the_hookless_twin_shares_every_tensor_and_stays_unpatched(tok):
    model = bench_model(tok, SHAPES["tiny"], torch.device("cpu"), torch.float32)
    twin = hookless_twin(model)
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    assert all(a is b for a, b in zip(model.buffers(), twin.buffers(), strict=True))
    ids = torch.randint(3, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    delta = random_delta(model, batch=2, rank=4, scale=1.0, std=1.0)
    with torch.no_grad():
        before = twin(ids).logits
        with patched(model, delta):
            assert not torch.equal(model(ids).logits, before)
            assert torch.equal(twin(ids).logits, before)  # the twin has no hooks: the delta never reaches it
    assert not any(m._forward_hooks for m in twin.modules())

