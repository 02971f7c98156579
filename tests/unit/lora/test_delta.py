"""LoRADelta: expanding, concatenating, selecting and saving rows, held to the merged model's logits."""

import pytest
import torch
from conftest import random_delta

from tflow import LoRADelta, patched
from tflow.errors import CheckpointError, DeltaError


def test_expand_repeats_each_row_in_place(qwen):
    delta = random_delta(qwen, batch=3)
    big = delta.expand(2)
    assert big.batch_size == 6
    for name, (a, b) in delta.factors.items():
        a2, b2 = big.factors[name]
        for row in range(6):
            assert torch.equal(a2[row], a[row // 2]) and torch.equal(b2[row], b[row // 2])


def test_concat_equals_sum_of_weighted_deltas(qwen, tok):
    d1 = random_delta(qwen, batch=2, rank=4, scale=0.5, seed=1)
    d2 = random_delta(qwen, batch=2, rank=2, scale=2.0, seed=2)
    fused = LoRADelta.concat([d1, d2], weights=[0.3, torch.tensor([1.5, -0.5])])
    name = next(iter(d1.factors))
    a, b = fused.factors[name]
    assert a.shape[1] == b.shape[2] == 6
    for row, w2 in enumerate([1.5, -0.5]):
        expected = 0.3 * d1.scale * d1.factors[name][1][row] @ d1.factors[name][0][row]
        expected += w2 * d2.scale * d2.factors[name][1][row] @ d2.factors[name][0][row]
        assert torch.allclose(fused.scale * b[row] @ a[row], expected, atol=1e-6)


def test_concat_keeps_gradient_of_tensor_weights(qwen):
    gate = torch.tensor(0.7, requires_grad=True)
    fused = LoRADelta.concat([random_delta(qwen, batch=1), random_delta(qwen, batch=1, seed=4)], [gate, 1.0])
    sum(b.sum() for _, b in fused.factors.values()).backward()
    assert gate.grad is not None and gate.grad != 0


def test_concat_rejects_mismatched_batches(qwen):
    with pytest.raises(DeltaError, match=r"equal batch sizes, got \[1, 2\]"):
        LoRADelta.concat([random_delta(qwen, batch=1), random_delta(qwen, batch=2)])


def test_num_bytes_to_and_select(qwen):
    delta = random_delta(qwen, batch=2, rank=4)
    expected = sum((4 * m.in_features + m.out_features * 4) * 2 * 4
                   for m in (dict(qwen.named_modules())[n] for n in delta.factors))
    assert delta.num_bytes == expected
    half = delta.to(dtype=torch.bfloat16)
    assert half.num_bytes == expected // 2
    assert all(a.dtype == torch.bfloat16 for a, _ in half.factors.values())
    one = delta.select(torch.tensor([1]))
    name = next(iter(delta.factors))
    assert torch.equal(one.factors[name][0][0], delta.factors[name][0][1])


def test_save_load_roundtrip_gives_same_logits(qwen, tok, tmp_path):
    delta = random_delta(qwen, batch=2, scale=0.25)
    delta.save(tmp_path / "d.safetensors")
    back = LoRADelta.load(tmp_path / "d.safetensors")
    assert back.scale == 0.25 and back.factors.keys() == delta.factors.keys()
    for name in delta.factors:
        assert all(torch.equal(x, y) for x, y in zip(delta.factors[name], back.factors[name], strict=True))
    ids = tok(["hello there", "hi"], return_tensors="pt", padding=True)
    with patched(qwen, delta), torch.no_grad():
        first = qwen(**ids).logits
    with patched(qwen, back), torch.no_grad():
        assert torch.equal(qwen(**ids).logits, first)


def test_load_refuses_pickles_and_garbage(tmp_path):
    pickled = tmp_path / "delta.pt"
    torch.save({"x": torch.ones(1)}, pickled)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LoRADelta.load(pickled)
    with pytest.raises(CheckpointError, match="does not exist"):
        LoRADelta.load(tmp_path / "missing.safetensors")


def test_empty_and_non_3d_factors_are_rejected():
    with pytest.raises(DeltaError, match="at least one module"):
        LoRADelta({})
    with pytest.raises(DeltaError, match=r"got A \(4, 8\)"):
        LoRADelta({"m": (torch.ones(4, 8), torch.ones(1, 8, 4))})


def test_row_norms_equal_the_frobenius_norm_of_every_merged_update(qwen):
    delta = random_delta(qwen, batch=3, scale=-0.5)
    for row, norm in enumerate(delta.row_norms()):
        squares = sum(((delta.scale * b[row] @ a[row]) ** 2).sum() for a, b in delta.factors.values())
        assert norm == pytest.approx(float(squares.sqrt()), rel=1e-4)


def test_zeroed_rows_patch_nothing_even_when_they_held_nan(qwen, tok):
    delta = random_delta(qwen, batch=2)
    name = next(iter(delta.factors))
    delta.factors[name][0][1, 0, 0] = float("nan")
    assert delta.row_norms().isnan().tolist() == [False, True]
    zeroed = delta.zero_rows(torch.tensor([False, True]))
    ids = tok(["hello world", "hello world"], return_tensors="pt")
    with torch.no_grad():
        plain = qwen(**ids).logits
        with patched(qwen, zeroed):
            patched_logits = qwen(**ids).logits
        with patched(qwen, delta.select(torch.tensor([True, False]))):
            first_alone = qwen(input_ids=ids.input_ids[:1]).logits
    assert torch.equal(patched_logits[1], plain[1])
    assert torch.allclose(patched_logits[0], first_alone[0], atol=1e-5)
    assert zeroed.row_norms()[1] == 0 and torch.equal(zeroed.factors[name][0][0], delta.factors[name][0][0])


def test_a_mean_of_more_ranks_than_the_module_is_wide_is_held_at_its_width():
    """200 queries x rank 8 > min(in, out): the mean update itself, one factor the identity."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, 24, generator=g), torch.randn(50, 16, 8, generator=g)
    tall = LoRADelta({"m": (torch.randn(50, 8, 16, generator=g), torch.randn(50, 24, 8, generator=g))}, 0.5)
    wide = LoRADelta({"m": (a, b)}, 0.5)  # out 16 < in 24; tall: out 24 > in 16
    for delta, rank in ((wide, 16), (tall, 16)):
        ma, mb = delta.mean().factors["m"]
        da, db = delta.factors["m"]
        assert ma.shape[:2] == (1, rank) and mb.shape[2] == rank
        torch.testing.assert_close(mb[0] @ ma[0], (db @ da).mean(0), atol=1e-5, rtol=1e-5)
    narrow = LoRADelta({"m": (a[:2], b[:2])}, 0.5).mean()  # 2 x 8 = 16 ranks: still concatenated
    assert torch.equal(narrow.factors["m"][0][0], a[:2].reshape(16, 24))
