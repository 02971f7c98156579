"""Generator kinds: exact output shapes, a fresh generator is a no-op, padding never leaks, gradients flow."""

import json

import pytest
import torch

import generators
from tflow import ReceiverSpec
from tflow.backbones.families import TargetModule
from tflow.errors import RecipeError, TargetError

KINDS = ["param_tokens", "mlp"]  # the kinds that emit per-row LoRA factors; basis: tests/test_basis.py
SMALL = {"d_model": 32, "depth": 2, "heads": 4}


def make(kind, spec, **overrides):
    torch.manual_seed(0)
    return generators.build({"kind": kind, **SMALL, **overrides}, spec, 64).eval()


def perturb_b_heads(gen, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.detokenizer.b.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def condition(n=3, t=6, h=64, seed=0):
    """Random cond [n, t, h] with left padding (row i has t - i real tokens), padding zeroed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] >= torch.arange(n)[:, None]
    return torch.randn(n, t, h, generator=g) * mask[..., None], mask


def test_registry_lists_kinds_in_registration_order():
    assert generators.available() == ["param_tokens", "mlp", "basis", "perceiver"]
    with pytest.raises(ValueError, match="already registered"):
        generators.register("mlp")(generators.Generator)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fixture", ["qwen", "llama"])
def test_outputs_cover_every_module_with_exact_shapes(request, fixture, kind):
    spec = ReceiverSpec.from_model(request.getfixturevalue(fixture))
    gen = make(kind, spec, rank=3)
    cond, mask = condition()
    out = gen(cond, mask)
    assert list(out) == spec.module_names
    for m in spec.modules:
        a, b = out[m.name]
        assert a.shape == (3, 3, m.in_features) and b.shape == (3, m.out_features, 3)
    k_proj = next(m for m in spec.modules if m.kind == "k_proj")
    assert out[k_proj.name][1].shape[1] == 32  # GQA: k/v are narrower than q


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_generator_is_an_exact_no_op(qwen, kind):
    spec = ReceiverSpec.from_model(qwen)
    out = make(kind, spec)(*condition())
    for name, (a, b) in out.items():
        assert torch.count_nonzero(b) == 0, name
        assert torch.count_nonzero(a) == a.numel(), name
        in_features = a.shape[-1]
        assert 0.3 < a.std().item() * in_features**0.5 < 3  # LoRA-like scale, O(1/sqrt(in))


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_influences_a_row(qwen, kind):
    spec = ReceiverSpec.from_model(qwen)
    gen = make(kind, spec)
    perturb_b_heads(gen)
    cond, mask = condition()
    garbage = torch.full((3, 5, 64), 1e4)
    padded_cond = torch.cat([garbage, torch.where(mask[..., None], cond, -3e4)], dim=1)
    padded_mask = torch.cat([torch.zeros(3, 5, dtype=torch.bool), mask], dim=1)
    with torch.no_grad():
        plain, padded = gen(cond, mask), gen(padded_cond, padded_mask.long())
        alone = gen(cond[2:, 2:], mask[2:, 2:])
    for name in spec.module_names:
        for x, y, z in zip(plain[name], padded[name], alone[name], strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
            torch.testing.assert_close(x[2:], z, atol=1e-6, rtol=0)
        assert torch.count_nonzero(plain[name][1]) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(qwen, kind):
    spec = ReceiverSpec.from_model(qwen)
    gen = make(kind, spec).train()
    perturb_b_heads(gen)
    out = gen(*condition())
    g = torch.Generator().manual_seed(2)
    loss = sum((f * torch.randn(f.shape, generator=g)).sum() for pair in out.values() for f in pair)
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert torch.count_nonzero(gen.cond_proj[0].weight.grad) == gen.cond_proj[0].weight.numel()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fixture", ["qwen", "llama"])
def test_subset_of_targets_and_layers(request, fixture, kind):
    spec = ReceiverSpec.from_model(request.getfixturevalue(fixture), ["q_proj", "v_proj"], layers=[1])
    out = make(kind, spec)(*condition())
    assert list(out) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert out["model.layers.1.self_attn.v_proj"][1].shape == (3, 32, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_config_is_resolved_serialisable_and_rebuilds(qwen, kind):
    spec = ReceiverSpec.from_model(qwen)
    gen = generators.build({"kind": kind, "d_model": 32, "alpha": 4, "dropout": None}, spec, 64)
    assert gen.config == {"kind": kind, "rank": 4, "alpha": 4.0, "d_model": 32, "depth": 2,
                          "heads": 4, "dropout": 0.0, "head_scale": 1 / 32}
    assert (gen.rank, gen.alpha, gen.scale) == (4, 4.0, 1.0)
    again = generators.build(json.loads(json.dumps(gen.config)), spec, 64)
    assert again.config == gen.config
    assert again.state_dict().keys() == gen.state_dict().keys()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rank": 0}, "generator.rank: must be > 0, got 0"),
        ({"alpha": -1.0}, "generator.alpha: must be > 0, got -1"),
        ({"depth": 0}, "generator.depth: must be >= 1, got 0"),
        ({"d_model": 30}, "generator.heads: must divide d_model 30, got 4"),
        ({"d_model": 30, "heads": 7}, "generator.heads: must divide d_model 30, got 7"),
        ({"dropout": 1.0}, "generator.dropout: must be < 1, got 1"),
        ({"rank": "4"}, "generator.rank: expected an integer, got '4'"),
        ({"num_tokens": 8}, "generator.num_tokens: unknown key for kind 'param_tokens' (known keys: kind, rank"),
    ],
)
def test_bad_config_raises_recipe_error(qwen, override, message):
    spec = ReceiverSpec.from_model(qwen)
    with pytest.raises(RecipeError) as err:
        generators.build({"kind": "param_tokens", **override}, spec, 64)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once(qwen):
    spec = ReceiverSpec.from_model(qwen)
    with pytest.raises(RecipeError) as err:
        generators.build({"kind": "mlp", "rank": 0, "alpha": 0, "depth": -1, "colour": 1}, spec, 64)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "generator.rank", "generator.alpha", "generator.depth", "generator.colour"
    ]


@pytest.mark.parametrize(("config", "what"), [({"kind": "lstm"}, "unknown generator 'lstm'"), ({}, "is required")])
def test_unknown_kind_lists_available(qwen, config, what):
    spec = ReceiverSpec.from_model(qwen)
    with pytest.raises(RecipeError) as err:
        generators.build(config, spec, 64)
    assert err.value.problems == [f"generator.kind: {what}; available: param_tokens, mlp, basis, perceiver"]


def test_kind_with_two_shapes_is_rejected():
    modules = (TargetModule("l.0.q", 0, "q_proj", 8, 8), TargetModule("l.1.q", 1, "q_proj", 8, 16))
    spec = ReceiverSpec("X", 8, 2, ("q_proj",), (0, 1), modules)
    with pytest.raises(TargetError, match=r"q_proj is \(8, 8\) in one layer but \(8, 16\) in l.1.q"):
        generators.build({"kind": "mlp"}, spec, 8)


@pytest.mark.parametrize("d_model", [32, 256])
def test_one_adam_step_moves_b_by_about_lr_whatever_d_model(qwen, d_model):
    # The default head_scale (1/d_model) is what keeps a deep receiver's training from diverging:
    # with head_scale 1 one Adam step moves B entries by ~lr * d_model.
    spec = ReceiverSpec.from_model(qwen, ["v_proj"], layers=[0])
    changes = {}
    for head_scale in (None, 1.0):
        torch.manual_seed(0)
        gen = generators.build({"kind": "mlp", "d_model": d_model, "head_scale": head_scale}, spec, 64)
        opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
        cond, mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
        a, b = gen(cond, mask)["model.layers.0.self_attn.v_proj"]
        (b * torch.randn_like(b)).sum().backward()
        opt.step()
        changes[head_scale] = gen(cond, mask)["model.layers.0.self_attn.v_proj"][1].abs().mean().item()
    assert 1e-4 < changes[None] < 2e-3
    assert changes[1.0] > 0.2 * d_model * changes[None]
