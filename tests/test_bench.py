import math

import pytest

from tflow.bench import run_bench, table
from tflow.errors import BenchError


def test_quick_tiny_bench_reports_every_figure_as_a_positive_number():
    result = run_bench("tiny", quick=True, repeats=1)
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
