"""The basis delta and generator: V M_b U per row on a shared basis, held to what per-row factors do."""

import pytest
import torch
from conftest import merged_copy, random_basis_delta
from helpers import PROMPTS, batch, logits

import generators
from tflow import ReceiverSpec, patched
from tflow.backbones import tiny
from tflow.channels import guard_delta
from tflow.channels.weights.fusion import fuse
from tflow.errors import DeltaError, RecipeError
from tflow.lora.basis import BasisDelta

SMALL = {"kind": "basis", "rank": 4, "d_model": 32, "depth": 1, "heads": 4}


def dense(delta: BasisDelta, name: str, row: int) -> torch.Tensor:
    u, v = delta.basis[name]
    return delta.scale * v @ delta.cores[name][row] @ u


def test_each_row_matches_its_merged_model(qwen, tok):
    ids, mask = batch(tok)
    delta = random_basis_delta(qwen, batch=4)
    with patched(qwen, delta):
        out = logits(qwen, ids, mask)
    for row in range(4):
        keep = mask[row].bool()
        alone = logits(merged_copy(qwen, delta, row), ids[row, keep][None], mask[row, keep][None])
        assert (out[row, keep] - alone[0]).abs().max().item() < 1e-4, row


def test_lora_form_is_the_same_update(qwen, tok):
    delta = random_basis_delta(qwen, batch=3, k=5)
    lora = delta.lora()
    for name, (a, b) in lora.factors.items():
        assert a.shape == (3, 5, a.shape[2]) and b.shape[2] == 5
        for row in range(3):
            torch.testing.assert_close(lora.scale * b[row] @ a[row], dense(delta, name, row))
    ids, mask = batch(tok, PROMPTS[:3])
    with patched(qwen, delta):
        got = logits(qwen, ids, mask)
    with patched(qwen, lora):
        want = logits(qwen, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_generate_matches_merged_per_row(qwen, tok, settings):
    ids, mask = batch(tok, PROMPTS[:3])
    delta = random_basis_delta(qwen, batch=3, seed=3, std=0.3)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, **settings)
    with patched(qwen, delta), torch.no_grad():
        new = qwen.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    assert not torch.equal(new, qwen.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:])
    n = settings.get("num_return_sequences", 1)
    for row in range(3):
        keep = mask[row].bool()
        ref = merged_copy(qwen, delta, row).generate(
            input_ids=ids[row, keep][None], attention_mask=mask[row, keep][None], **gen)[:, keep.sum():]
        for k in range(n):
            assert torch.equal(new[row * n + k][: ref.shape[1]], ref[k]), (row, k)


def test_restored_bit_exactly_and_zero_cores_are_a_no_op(qwen, tok):
    ids, mask = batch(tok)
    before = logits(qwen, ids, mask)
    delta = random_basis_delta(qwen, batch=4)
    with pytest.raises(RuntimeError), patched(qwen, delta):
        assert not torch.equal(logits(qwen, ids, mask), before)
        raise RuntimeError("boom")
    assert torch.equal(logits(qwen, ids, mask), before)
    with patched(qwen, delta.zero_rows(torch.ones(4, dtype=torch.bool))):
        assert torch.equal(logits(qwen, ids, mask), before)


def test_flat_inputs_and_gradients_reach_basis_and_cores():
    linear = torch.nn.Linear(16, 8)
    u, v = torch.randn(3, 16, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    m = torch.randn(4, 3, 3, requires_grad=True)
    delta = BasisDelta({"": (u, v)}, {"": m}, scale=0.5)
    x = torch.randn(4, 16)
    with patched(linear, delta, validate=False):
        y = linear(x)
    want = linear(x) + 0.5 * torch.einsum("ok,bkj,ji,bi->bo", v, m, u, x)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (u, v, m))


@pytest.mark.slow  # compiling takes about a minute on a CPU
def test_a_compiled_model_follows_a_basis_delta(tok):
    model = tiny.model(tok, hidden_size=64, num_layers=2, seed=5)
    ids, mask = batch(tok)
    delta = random_basis_delta(model, batch=4, seed=1)
    compiled = torch.compile(model)
    with torch.no_grad():
        plain = compiled(input_ids=ids, attention_mask=mask).logits
        with patched(model, delta):
            eager = model(input_ids=ids, attention_mask=mask).logits
            got = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, plain)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)


def test_norms_come_from_gram_matrices_and_equal_the_dense_update(qwen):
    delta = random_basis_delta(qwen, batch=3)
    for name, norms in delta.module_row_norms().items():
        want = torch.stack([dense(delta, name, row).norm() for row in range(3)])
        torch.testing.assert_close(norms, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(delta.row_norms(), delta.lora().row_norms(), rtol=1e-4, atol=1e-5)


def test_guard_refuses_a_row_above_the_bound_and_a_row_not_finite(qwen):
    delta = random_basis_delta(qwen, batch=3)
    cores = dict(delta.cores)
    name = next(iter(cores))
    cores[name] = cores[name].clone()
    cores[name][2, 0, 0] = float("nan")
    delta = BasisDelta(delta.basis, cores, delta.scale)
    norms = delta.row_norms()
    bound = float((norms[0] + norms[1]) / 2)
    guarded, reasons = guard_delta(delta, bound)
    big = 0 if norms[0] > norms[1] else 1
    assert [r is None for r in reasons] == [big != 0, big != 1, False]
    assert "not finite" in reasons[2] and "exceeds generator.max_delta_norm" in reasons[big]
    assert guarded.row_norms()[[big, 2]].tolist() == [0.0, 0.0]


def test_fusion_adds_cores_exactly_and_keeps_the_message_small(qwen, tok):
    first, second = random_basis_delta(qwen, batch=2, seed=1), random_basis_delta(qwen, batch=2, seed=2)
    second = BasisDelta(first.basis, second.cores, 0.25)
    gate = torch.tensor(0.7, requires_grad=True)
    fused = fuse([first, second], [gate, torch.tensor([1.5, -0.5])])
    for name, core in fused.cores.items():
        want = 0.7 * first.cores[name] + torch.tensor([1.5, -0.5])[:, None, None] * 0.5 * second.cores[name]
        torch.testing.assert_close(core, want)
    assert fused.num_bytes == first.num_bytes == 2 * len(first.cores) * 4 * 4 * 4  # two rows of K² floats each
    ids, mask = batch(tok, PROMPTS[:2])
    with patched(qwen, fused):
        got = logits(qwen, ids, mask)
    with patched(qwen, fuse([first.lora(), second.lora()], [0.7, torch.tensor([1.5, -0.5])])):
        want = logits(qwen, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    other = random_basis_delta(qwen, batch=2, seed=9)
    with pytest.raises(DeltaError, match="one shared basis"):
        fuse([first, other])


def test_mean_select_stack_and_save_load_round_trip(qwen, tmp_path):
    delta = random_basis_delta(qwen, batch=3)
    name = next(iter(delta.cores))
    torch.testing.assert_close(dense(delta.mean(), name, 0), sum(dense(delta, name, r) for r in range(3)) / 3)
    again = BasisDelta.stack_rows([delta.select(slice(0, 1)), delta.select(slice(1, 3))])
    assert all(torch.equal(again.cores[k], delta.cores[k]) for k in delta.cores)
    assert delta.expand(2).cores[name][1].equal(delta.cores[name][0])
    delta.save(tmp_path / "d.safetensors")
    loaded = BasisDelta.load(tmp_path / "d.safetensors")
    assert loaded.scale == delta.scale and sorted(loaded.modules) == sorted(delta.modules)
    assert all(torch.equal(loaded.cores[k], delta.cores[k]) and torch.equal(loaded.basis[k][1], delta.basis[k][1])
               for k in delta.cores)


def test_a_core_that_disagrees_with_the_basis_is_a_one_line_error():
    u, v = torch.zeros(4, 16), torch.zeros(8, 4)
    with pytest.raises(DeltaError, match=r"the core \(2, 3, 3\) disagrees with the basis .* must be \[batch, 4, 4\]"):
        BasisDelta({"m": (u, v)}, {"m": torch.zeros(2, 3, 3)})
    with pytest.raises(DeltaError, match="same modules"):
        BasisDelta({"m": (u, v)}, {"n": torch.zeros(2, 4, 4)})


def test_fresh_generator_is_a_no_op_and_padding_never_moves_a_row(qwen):
    spec = ReceiverSpec.from_model(qwen)
    torch.manual_seed(0)
    gen = generators.build(SMALL, spec, 64).eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(6)[None, :] >= torch.arange(3)[:, None]
    cond = torch.randn(3, 6, 64, generator=g) * mask[..., None]
    fresh = gen.delta(cond, mask)
    assert isinstance(fresh, BasisDelta) and fresh.row_norms().tolist() == [0.0, 0.0, 0.0]
    assert all(u.shape == (4, m.in_features) and v.shape == (m.out_features, 4)
               for m, (u, v) in zip(spec.modules, fresh.basis.values(), strict=True))
    with torch.no_grad():
        for p in gen.detokenizer.core.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        plain = gen.delta(cond, mask)
        padded = gen.delta(torch.cat([torch.full((3, 4, 64), 1e4), cond], 1),
                           torch.cat([torch.zeros(3, 4, dtype=torch.bool), mask], 1))
        alone = gen.delta(cond[2:, 2:], mask[2:, 2:])
    assert plain.row_norms().min() > 0
    for name in plain.cores:
        torch.testing.assert_close(plain.cores[name], padded.cores[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(plain.cores[name][2:], alone.cores[name], atol=1e-6, rtol=0)


def test_gradient_reaches_every_generator_parameter(qwen):
    spec = ReceiverSpec.from_model(qwen)
    torch.manual_seed(0)
    gen = generators.build(SMALL, spec, 64).train()
    with torch.no_grad():
        for p in gen.detokenizer.core.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    delta = gen.delta(torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool))
    delta.row_norms()  # detached: must not cut the graph
    lora = delta.lora()
    g = torch.Generator().manual_seed(2)
    sum((b * torch.randn(b.shape, generator=g)).sum() for _, b in lora.factors.values()).backward()
    for name, p in gen.named_parameters():
        if name.startswith("detokenizer.u."):
            continue  # B = V M does not involve U; the patched forward test covers U's gradient
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize(("override", "message"), [
    ({"rank": 0}, "generator.rank: must be > 0, got 0"),
    ({"rank": -2}, "generator.rank: must be > 0, got -2"),
])
def test_k_not_positive_is_a_one_line_error(qwen, override, message):
    with pytest.raises(RecipeError) as err:
        generators.build({**SMALL, **override}, ReceiverSpec.from_model(qwen), 64)
    assert err.value.problems == [message]


def test_basis_defaults_to_k_16():
    from tflow.config.recipe import load_recipe

    assert load_recipe("recipes/tiny.yaml", ["generator.kind=basis", "generator.rank=null"]).generator.rank == 16
    assert load_recipe("recipes/tiny.yaml", ["generator.rank=null"]).generator.rank == 4
