"""Per-row hooks: every row equals its merged model, peft's LoRA, and the receiver is restored bit-exactly."""

import copy
import threading

import pytest
import torch
from conftest import merged_copy, random_basis_delta, random_delta
from helpers import PROMPTS, batch, logits

from tflow import LoRADelta, ReceiverSpec, patched
from tflow.backbones import tiny
from tflow.errors import DeltaError, PatchError
from tflow.lora.patching import attach, detach, slot


def test_each_row_matches_its_merged_model(qwen, tok):
    ids, mask = batch(tok)
    delta = random_delta(qwen, batch=4)
    assert len(delta.factors) == 7 * 2  # all 7 linear types in both layers
    with patched(qwen, delta):
        out = logits(qwen, ids, mask)
    for row in range(4):
        keep = mask[row].bool()
        alone = logits(merged_copy(qwen, delta, row), ids[row, keep][None], mask[row, keep][None])
        diff = (out[row, keep] - alone[0]).abs().max().item()
        assert diff < 1e-4, f"row {row}: max abs diff {diff}"


def test_row0_matches_peft_lora(qwen, tok):
    from peft import LoraConfig, get_peft_model

    ids, mask = batch(tok)
    delta = random_delta(qwen, batch=4, rank=4, scale=0.5)
    with patched(qwen, delta):
        out = logits(qwen, ids, mask)
    cfg = LoraConfig(r=4, lora_alpha=0.5 * 4, target_modules=list(ReceiverSpec.from_model(qwen).targets))
    peft_model = get_peft_model(copy.deepcopy(qwen), cfg)
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, (a, b) in delta.factors.items():
            layer = modules[f"base_model.model.{name}"]
            layer.lora_A["default"].weight.copy_(a[0])
            layer.lora_B["default"].weight.copy_(b[0])
    keep = mask[0].bool()
    ref = logits(peft_model, ids[0, keep][None], mask[0, keep][None])
    assert (out[0, keep] - ref[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("settings", [
    dict(),
    dict(num_beams=2),
    dict(num_beams=2, num_return_sequences=2),
    dict(cache_implementation="static"),
])
def test_generate_matches_merged_per_row(qwen, tok, settings):
    ids, mask = batch(tok, PROMPTS[:3])
    delta = random_delta(qwen, batch=3, std=0.3, seed=3)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, **settings)
    with patched(qwen, delta), torch.no_grad():
        out = qwen.generate(input_ids=ids, attention_mask=mask, **gen)
    n = settings.get("num_return_sequences", 1)
    new = out[:, ids.shape[1]:]
    plain = qwen.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    assert not torch.equal(new, plain), "the delta should change the generation"
    for row in range(3):
        keep = mask[row].bool()
        ref = merged_copy(qwen, delta, row).generate(
            input_ids=ids[row, keep][None], attention_mask=mask[row, keep][None], **gen
        )[:, keep.sum():]
        for k in range(n):
            got = new[row * n + k][: ref.shape[1]]
            assert torch.equal(got, ref[k]), f"row {row} sequence {k}: {got} vs {ref[k]}"


def test_restored_bit_exactly_after_block_exception_and_interrupt(qwen, tok):
    ids, mask = batch(tok)
    before = logits(qwen, ids, mask)
    delta = random_delta(qwen, batch=4)
    with patched(qwen, delta):
        assert not torch.equal(logits(qwen, ids, mask), before)
    assert torch.equal(logits(qwen, ids, mask), before)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), patched(qwen, delta):
            logits(qwen, ids, mask)
            raise exc
        assert torch.equal(logits(qwen, ids, mask), before)
    # the slot is free again: a new patch is accepted
    with patched(qwen, delta):
        pass


def test_zero_b_is_bit_exact_noop(qwen, tok):
    ids, mask = batch(tok)
    before = logits(qwen, ids, mask)
    delta = random_delta(qwen, batch=4)
    zero = LoRADelta({k: (a, torch.zeros_like(b)) for k, (a, b) in delta.factors.items()}, scale=2.0)
    with patched(qwen, zero):
        assert torch.equal(logits(qwen, ids, mask), before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_factors_and_their_producer(qwen, tok, checkpointing):
    model = copy.deepcopy(qwen)
    model.requires_grad_(False)
    spec = ReceiverSpec.from_model(model)
    torch.manual_seed(0)
    producer = torch.nn.Linear(8, 16)
    z = torch.randn(2, 8)
    code = producer(z)  # [2, 16]
    rank = 2
    factors = {}
    for m in spec.modules:
        a = code[:, :rank, None] * torch.ones(1, 1, m.in_features) * 0.1
        b = code[:, rank : 2 * rank].reshape(2, 1, rank) * torch.ones(1, m.out_features, 1) * 0.1
        factors[m.name] = (a.contiguous(), b.contiguous())
    for a, b in factors.values():
        a.retain_grad()
        b.retain_grad()
    delta = LoRADelta(factors, scale=1.0)
    ids, mask = batch(tok, PROMPTS[:2])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with patched(model, delta):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
    assert torch.isfinite(loss)
    for name, (a, b) in factors.items():
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        assert b.grad is not None and b.grad.abs().sum() > 0, name
    assert producer.weight.grad is not None and producer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [random_delta, random_basis_delta])
def test_checkpointed_gradients_equal_plain_gradients(qwen, tok, make):
    ids, mask = batch(tok, PROMPTS[:2])
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(qwen)
        model.requires_grad_(False)
        delta = make(model, batch=2, seed=5)
        leaves = [t.requires_grad_() for t in tensors(delta)]
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with patched(model, delta):
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append(torch.cat([t.grad.flatten() for t in leaves]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def tensors(delta):
    """Every tensor a delta is made of: A and B, or U, V and the cores."""
    if isinstance(delta, LoRADelta):
        return [t for pair in delta.factors.values() for t in pair]
    return [t for pair in delta.basis.values() for t in pair] + list(delta.cores.values())


def test_unknown_module_and_shape_mismatch_raise_typed_errors(qwen):
    delta = random_delta(qwen, batch=1)
    name, (a, b) = next(iter(delta.factors.items()))
    with pytest.raises(DeltaError, match=r"'model.layers.0.self_attn.qq_proj' does not exist"):
        with patched(qwen, LoRADelta({"model.layers.0.self_attn.qq_proj": (a, b)})):
            pass
    wrong = LoRADelta({name: (a[:, :, :-1], b)})
    with pytest.raises(DeltaError, match=rf"{name}: delta A \(1, 4, 63\) / B \(1, 64, 4\) do not fit Linear\(in=64, out=64\)"):
        with patched(qwen, wrong):
            pass
    with pytest.raises(DeltaError, match="disagree on batch or rank"):
        LoRADelta({name: (a, b[:, :, :2])})


def test_batch_not_a_multiple_of_delta_rows_is_an_error(qwen, tok):
    ids, mask = batch(tok, PROMPTS[:3])
    with pytest.raises(PatchError, match="batch of 3 rows but the delta has 2"), patched(qwen, random_delta(qwen, batch=2)):
        logits(qwen, ids, mask)


def test_second_thread_gets_clear_error_never_mixed_rows(qwen, tok):
    ids, mask = batch(tok)
    d1, d2 = random_delta(qwen, batch=4, seed=1), random_delta(qwen, batch=4, seed=2)
    with patched(qwen, d1):
        expected = logits(qwen, ids, mask)
    inside, release = threading.Event(), threading.Event()
    results = {}

    def first():
        with patched(qwen, d1):
            inside.set()
            release.wait(10)
            results["first"] = logits(qwen, ids, mask)

    def second():
        inside.wait(10)
        try:
            with patched(qwen, d2):
                results["second"] = "ran"
        except PatchError as err:
            results["second"] = err
        release.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert isinstance(results["second"], PatchError)
    assert "already patched" in str(results["second"])
    assert torch.equal(results["first"], expected)


def test_nested_patch_is_refused_and_outer_survives(qwen, tok):
    ids, mask = batch(tok)
    d = random_delta(qwen, batch=4)
    with patched(qwen, d):
        expected = logits(qwen, ids, mask)
        with pytest.raises(PatchError), patched(qwen, d):
            pass
        assert torch.equal(logits(qwen, ids, mask), expected)


def lora_reference(linear, x, a, b, scale):
    """W x + bias + scale * B_b (A_b x) per row, written out with einsum."""
    return linear(x) + scale * torch.einsum("bor,bri,b...i->b...o", b, a, x)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("shape", [(4, 5, 16), (4, 16)])
def test_hook_fast_path_equals_the_lora_formula_and_keeps_gradients(grad, shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    a = torch.randn(4, 3, 16, requires_grad=True)
    b = torch.randn(4, 12, 3, requires_grad=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = lora_reference(model[0], x, a, b, 0.7)
    with torch.set_grad_enabled(grad), patched(model, LoRADelta({"0": (a, b)}, scale=0.7)):
        got = model(x)
        if grad:  # out of place, so the base output stays intact for autograd
            got.square().sum().backward()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    if grad:
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_factors_prepared_under_no_grad_still_carry_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    a, b = torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 8, 2, requires_grad=True)
    with torch.no_grad():
        attach(model, LoRADelta({"0": (a, b)}))
    try:
        model(torch.randn(2, 8)).sum().backward()
    finally:
        detach(model)
    assert a.grad is not None and b.grad is not None


def test_factors_follow_the_module_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.float64)
    a, b = torch.randn(2, 4, 16), torch.randn(2, 16, 4)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with patched(model, LoRADelta({"0": (a, b)}, scale=0.5)), torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float64
    expected = lora_reference(model[0], x, a.double(), b.double(), 0.5)
    assert (got - expected).abs().max().item() < 1e-10


def test_expanded_batches_switch_back_and_forth_within_one_patch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    a, b = torch.randn(2, 2, 8), torch.randn(2, 8, 2)
    x = torch.randn(2, 8)
    with patched(model, LoRADelta({"0": (a, b)})), torch.no_grad():
        outs = [model(x), model(x.repeat_interleave(3, 0)), model(x)]
    assert torch.allclose(outs[1], outs[0].repeat_interleave(3, 0), atol=1e-6)
    assert torch.equal(outs[2], outs[0])


@pytest.mark.slow  # compiling takes about a minute on a CPU
def test_a_compiled_model_follows_whatever_the_slot_holds(tok):
    model = tiny.model(tok, hidden_size=64, num_layers=2, seed=5)
    ids, mask = batch(tok)
    first, second = random_delta(model, batch=4, seed=1), random_delta(model, batch=4, seed=2)

    def logits(module, delta):
        with torch.no_grad():
            if delta is None:
                return module(input_ids=ids, attention_mask=mask).logits
            with patched(model, delta):
                return module(input_ids=ids, attention_mask=mask).logits

    twin = copy.deepcopy(model)
    torch.compile(twin)(input_ids=ids, attention_mask=mask)  # a graph of the same architecture, never patched
    compiled = torch.compile(model)
    logits(compiled, None)  # traced before the model has any hook
    eager = {name: logits(model, d) for name, d in (("first", first), ("second", second), ("none", None))}
    for name, d in (("first", first), ("second", second), ("none", None), ("first", first)):
        torch.testing.assert_close(logits(compiled, d), eager[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager["first"], eager["none"])


@pytest.mark.parametrize("grad", [False, True])
def test_a_one_row_delta_serves_every_row_without_copies(grad):
    """A static mean is one row of rank batch * r: applied to each row of x, never repeated per row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    a = torch.randn(1, 40, 16, requires_grad=True)
    b = torch.randn(1, 12, 40, requires_grad=True)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        expected = lora_reference(model[0], x, a.expand(5, -1, -1), b.expand(5, -1, -1), 0.7)
    with torch.set_grad_enabled(grad), patched(model, LoRADelta({"0": (a, b)}, scale=0.7)):
        got = model(x)
        assert slot(model)._live["0"].a.shape[0] == 1  # not expanded to the 5 rows
        if grad:
            got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # rank 40: float sums
    if grad:
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
