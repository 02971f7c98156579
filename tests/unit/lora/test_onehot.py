"""A one-hot B (a copy head's) held as ids and values behaves exactly as its dense tensor."""

import pytest
import torch

from tflow import LoRADelta, patched
from tflow.channels.weights import diagnostics
from tflow.channels.weights.diagnostics import _gram
from tflow.errors import DeltaError
from tflow.lora.onehot import OneHotColumns, dense

VOCAB = 512  # the tiny model's LM head: Linear(64 -> 512)


def one_hot_delta(batch=3, rank=5, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, rank, 64, generator=g) * 0.3
    ids = torch.randint(0, VOCAB, (batch, rank), generator=g)
    ids[:, 1] = ids[:, 0]  # a token twice in a row: its votes add
    values = torch.randn(batch, rank, generator=g)
    b = OneHotColumns(ids, values, VOCAB)
    return LoRADelta({"lm_head": (a, b)}, scale), LoRADelta({"lm_head": (a, dense(b))}, scale)


def lm_logits(model, delta, ids):
    with torch.no_grad(), patched(model, delta):
        return model(input_ids=ids).logits


def test_patched_logits_norms_and_sizes_equal_the_dense_delta(qwen):
    sparse, full = one_hot_delta()
    ids = torch.randint(3, 500, (3, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lm_logits(qwen, sparse, ids), lm_logits(qwen, full, ids), atol=1e-5)
    assert torch.allclose(sparse.row_norms(), full.row_norms(), rtol=1e-5)
    assert torch.allclose(_gram(sparse), _gram(full), rtol=1e-4, atol=1e-6)
    a_bytes = 3 * 5 * 64 * 4
    assert (sparse.num_bytes, full.num_bytes) == (a_bytes + 3 * 5 * (8 + 4), a_bytes + 3 * VOCAB * 5 * 4)
    beams = torch.cat([ids, ids]).reshape(2, 3, 7).transpose(0, 1).reshape(6, 7)  # each row twice in place
    assert torch.allclose(lm_logits(qwen, sparse, beams), lm_logits(qwen, full, beams), atol=1e-5)


def test_gram_in_blocks_of_one_row_equals_the_whole_matrix(monkeypatch):
    sparse, full = one_hot_delta(batch=5, rank=4, seed=3)
    whole = _gram(full)
    monkeypatch.setattr(diagnostics, "GRAM_BLOCK_ELEMENTS", 1)  # one row of queries per block
    assert torch.allclose(_gram(full), whole, rtol=1e-5, atol=1e-6)
    assert torch.allclose(_gram(sparse), whole, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(diagnostics, "GRAM_BLOCK_ELEMENTS", 2 * 4 * 5 * 4)  # two rows, then one
    assert torch.allclose(_gram(sparse), whole, rtol=1e-4, atol=1e-6)


def test_norms_past_the_gram_size_come_from_the_update_and_equal_the_dense_ones():
    # 40 queries x rank 5: the static mean's one-hot B has rank 200, and 200² > 64 * 512, so its
    # norm is taken from B A, not from a 200 x 200 Gram; the dense mean is held at rank 64.
    sparse, full = one_hot_delta(batch=40, rank=5, seed=4)
    mean = sparse.mean()
    a, b = mean.factors["lm_head"]
    assert a.shape[1] ** 2 > 64 * VOCAB and isinstance(b, OneHotColumns)
    expected = (dense(b) @ a).square().sum((1, 2)).sqrt() * abs(mean.scale)
    assert torch.allclose(mean.row_norms(), expected, rtol=1e-5)
    assert torch.allclose(mean.row_norms(), full.mean().row_norms(), rtol=1e-4)
    assert torch.allclose(sparse.row_norms(), full.row_norms(), rtol=1e-5)


def test_every_delta_operation_keeps_it_equal_to_the_dense_one(qwen):
    sparse, full = one_hot_delta()
    other_sparse, other_full = one_hot_delta(rank=2, seed=2)
    rows = torch.tensor([True, False, True])
    weight = torch.tensor([0.5, 2.0, -1.0])
    pairs = [
        (LoRADelta.concat([sparse, other_sparse], [weight, 3.0]), LoRADelta.concat([full, other_full], [weight, 3.0])),
        (LoRADelta.stack_rows([sparse, other_sparse]), LoRADelta.stack_rows([full, other_full])),
        (sparse.mean(), full.mean()), (sparse.zero_rows(rows), full.zero_rows(rows)),
        (sparse.select(rows), full.select(rows)), (sparse.expand(2), full.expand(2)), (sparse.scaled(3.0), full.scaled(3.0)),
    ]
    for got, want in pairs:
        (a, b), (a2, b2) = got.factors["lm_head"], want.factors["lm_head"]
        assert isinstance(b, OneHotColumns) and got.scale == want.scale
        assert torch.equal(a, a2) and torch.allclose(dense(b), b2) and b.shape == b2.shape


def test_it_saves_and_loads_and_keeps_the_gradient_of_its_values(qwen, tmp_path):
    sparse, _ = one_hot_delta()
    sparse.save(tmp_path / "delta.safetensors")
    loaded = LoRADelta.load(tmp_path / "delta.safetensors")
    (a, b), (a2, b2) = sparse.factors["lm_head"], loaded.factors["lm_head"]
    assert torch.equal(a, a2) and isinstance(b2, OneHotColumns)
    assert torch.equal(b.ids, b2.ids) and torch.equal(b.values, b2.values)
    values = b.values.clone().requires_grad_()
    delta = LoRADelta({"lm_head": (a, OneHotColumns(b.ids, values, VOCAB))}, 0.5)
    with patched(qwen, delta):
        qwen(input_ids=torch.tensor([[5, 6, 7]] * 3)).logits[0, -1, b.ids[0, 0]].backward()
    assert values.grad is not None and values.grad[0, 0] != 0 and values.grad[1:].eq(0).all()


def test_bad_one_hot_factors_are_one_line_errors():
    with pytest.raises(DeltaError, match=r"ids and values of one \[batch, rank\] shape, got \(2, 3\) and \(2, 4\)"):
        OneHotColumns(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), VOCAB)
    with pytest.raises(DeltaError, match=r"integer ids in \[0, 512\)"):
        OneHotColumns(torch.full((1, 2), 512), torch.zeros(1, 2), VOCAB)
    with pytest.raises(DeltaError, match="disagree on batch or rank"):
        LoRADelta({"lm_head": (torch.zeros(1, 3, 64), OneHotColumns(torch.zeros(1, 2, dtype=torch.long),
                                                                      torch.zeros(1, 2), VOCAB))})


def test_a_one_row_mean_patches_a_batch_as_its_dense_mean(qwen):
    """The static ablation's delta: one row of one-hot columns serves every row of the batch."""
    sparse, full = one_hot_delta()
    ids = torch.randint(3, 500, (3, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lm_logits(qwen, sparse.mean(), ids), lm_logits(qwen, full.mean().expand(3), ids), atol=1e-5)
