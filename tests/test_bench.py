import math

import pytest
import torch
from conftest import random_delta

from tflow.bench import SHAPES, bench_model, hookless_twin, run_bench, table
from tflow.errors import BenchError
from tflow.patching import patched


def test_quick_bench_of_a_recipe_reports_every_figure_as_a_positive_number(tmp_path):
    # A recipe's own receiver backbone (here the tiny recipe's); `--shape tiny` is the same model
    # built by bench_model, covered below.
    from tflow.recipe import load_recipe

    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path / 'tiny'}"])
    result = run_bench(quick=True, repeats=1, recipe=recipe)
    assert result["shape"] == str(tmp_path / "tiny")
    assert result["model"]["hidden_size"] == recipe.model.tiny.hidden_size
    figures = [result["patch_overhead"], result["weights_vs_none"], result["text_vs_weights"]]
    figures += [v for d in result["decode"] for k, v in d.items() if k.endswith(("_s", "ratio"))]
    figures += [result["encoding"][k] for k in ("batched_s", "per_sender_s", "speedup")]
    figures += [v for g in result["generator"].values() for v in g.values()]
    figures += [c["seconds"] for c in result["channels"].values()]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in figures), figures
    assert {(d["batch"], d["rank"]) for d in result["decode"]} == {(8, 8), (1, 8)}
    assert set(result["channels"]) == {"none", "text", "weights"}
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

