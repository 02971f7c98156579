"""The perceiver generator: each layer's factors from that layer's sender states, exactly zero at
the start, exact shapes, no leak from padding, and a weights channel that fuses, ablates and saves it."""

import pytest
import torch
from conftest import hypernet, perturb

import generators
import tflow
from tflow import Receiver, ReceiverSpec, Sender
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.channels.weights import diagnostics
from tflow.channels.weights import part as weights_part
from tflow.channels.weights.hypernetwork import layer_states
from tflow.config.recipe import load_recipe
from tflow.errors import RecipeError, TargetError

SMALL = {"kind": "perceiver", "d_model": 32, "depth": 2, "heads": 4, "rank": 3}


def make(spec, **overrides):
    torch.manual_seed(0)
    return generators.build({**SMALL, **overrides}, spec, 64).eval()


def condition(n=3, layers=2, t=6, h=64, seed=0):
    """Random per-layer cond [n, layers, t, h]; row i has its first i positions padded (zero)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] >= torch.arange(n)[:, None]
    return torch.randn(n, layers, t, h, generator=g) * mask[:, None, :, None], mask


@pytest.mark.parametrize("bias_delta", [True, False])
@pytest.mark.parametrize("fixture", ["qwen", "llama"])
def test_shapes_for_every_target_with_and_without_the_bias_lora(request, fixture, bias_delta):
    spec = ReceiverSpec.from_model(request.getfixturevalue(fixture), ["down_proj", "k_proj"])
    out = make(spec, bias_delta=bias_delta)(*condition())
    ranks = 6 if bias_delta else 3
    assert list(out) == spec.module_names
    for m in spec.modules:
        a, b = out[m.name]
        assert a.shape == (3, ranks, m.in_features) and b.shape == (3, m.out_features, ranks)


@pytest.mark.parametrize("rank_scalars", [True, False])
def test_a_fresh_generator_is_exactly_zero(qwen, rank_scalars):
    spec = ReceiverSpec.from_model(qwen, ["down_proj", "q_proj"])
    gen = make(spec, rank_scalars=rank_scalars)
    assert gen.config["head_scale"] == 1.0 and gen.config["rank_scalars"] is rank_scalars
    for name, (a, b) in gen(*condition()).items():
        assert torch.count_nonzero(b) == 0, name
        assert 0.3 < a[:, :3].std().item() * a.shape[-1] ** 0.5 < 3, name  # generated A rows look like a LoRA's


def test_each_layer_reads_its_own_states(qwen):
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    gen = make(spec)
    perturb(gen, seed=1, std=0.1)
    cond, mask = condition()
    moved = cond.clone()
    moved[:, 1] += torch.randn(moved[:, 1].shape) * mask[..., None]
    with torch.no_grad():
        before, after = gen(cond, mask), gen(moved, mask)
    first, second = spec.module_names
    assert all(torch.equal(x, y) for x, y in zip(before[first], after[first], strict=True))
    assert not torch.allclose(before[second][1], after[second][1])


def test_padding_never_influences_a_row(qwen):
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    gen = make(spec)
    perturb(gen, seed=1, std=0.1)
    cond, mask = condition()
    garbage = torch.full((3, 2, 5, 64), 1e4)
    padded = torch.cat([torch.where(mask[:, None, :, None], cond, -3e4), garbage], dim=2)
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain, right, alone = gen(cond, mask), gen(padded, padded_mask), gen(cond[2:, :, 2:], mask[2:, 2:])
    for name in spec.module_names:
        for x, y, z in zip(plain[name], right[name], alone[name], strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
            torch.testing.assert_close(x[2:], z, atol=1e-5, rtol=0)


def test_the_first_step_reaches_the_b_scalars_and_later_ones_every_parameter(qwen):
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    gen = make(spec).train()
    g = torch.Generator().manual_seed(2)

    def step():
        gen.zero_grad()
        out = gen(*condition())
        sum(((b @ a) * torch.randn(b.shape[0], b.shape[1], a.shape[2], generator=g)).sum()  # on each update B A
            for a, b in out.values()).backward()
        return {name: p.grad is not None and bool(torch.count_nonzero(p.grad)) for name, p in gen.named_parameters()}

    first = step()
    assert first["detokenizer.scale_b.down_proj"] and first["detokenizer.bias_b.down_proj"]
    assert not first["latents"]  # B is zero, so nothing upstream of it moves the delta yet
    with torch.no_grad():
        gen.detokenizer.scale_b["down_proj"].fill_(0.1)
        gen.detokenizer.bias_b["down_proj"].normal_()
    assert all(step().values())


def test_a_deeper_sender_is_read_at_the_same_relative_depth():
    hidden = torch.arange(5.0)[:, None, None, None].expand(5, 2, 3, 4)  # a 4-layer sender: states 0..4
    spec = ReceiverSpec("X", 4, 2, ("down_proj",), (0, 1), ())
    assert layer_states(hidden, spec)[0, :, 0, 0].tolist() == [0.0, 2.0]


def test_bad_settings_are_one_clear_error(qwen, tmp_path):
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    with pytest.raises(RecipeError, match="generator.rank: must be > 0, got 0"):
        generators.build({**SMALL, "rank": 0}, spec, 64)
    with pytest.raises(RecipeError, match=r"generator.normalise_rank: unknown key \(did you mean normalize_rank\?\)"):
        load_recipe("recipes/tiny.yaml", ["generator.kind=perceiver", "generator.normalise_rank=true"])
    with pytest.raises(RecipeError, match="copy_head: not available with kind perceiver"):
        load_recipe("recipes/tiny.yaml", ["generator.kind=perceiver", "generator.copy_head=true"])
    with pytest.raises(TargetError, match=r"target modules \['qkv_proj'\] do not exist in this Qwen3 model"):
        tflow.load("recipes/tiny.yaml", overrides=[f"model.path={tmp_path}/model", "generator.kind=perceiver",
                                                   "generator.targets=[qkv_proj]"])


def test_the_weights_channel_fuses_ablates_and_saves_it(qwen, tok, tmp_path):
    senders = [Sender(qwen, tok, "You are a strategist.", name="strategist"),
               Sender(qwen, tok, "You extract knowledge.", name="extractor", context="The secret code is 482.")]
    net = hypernet(qwen, 2, kind="perceiver", seed=1, std=0.05)
    assert net.aggregation is None and net.generator.reads_layers
    queries = ["What is the secret code?", "Hi", "one two three four five"]
    states = encode(senders, queries)
    with torch.no_grad():
        fused, shares = net(states), net.shares(states)
    a, b = next(iter(fused.factors.values()))
    assert a.shape[:2] == (3, 2 * 2 * 2)  # 2 senders x (rank 2 generated + 2 bias)
    merged = type(fused).concat(shares)
    for name, (a, b) in fused.factors.items():
        torch.testing.assert_close(a, merged.factors[name][0])
        torch.testing.assert_close(b, merged.factors[name][1])
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    receiver.generator = net
    deltas = diagnostics.sender_deltas(senders, receiver, queries)
    rows = diagnostics.ablate(deltas, ["shuffled", "static"])
    assert rows["shuffled"].batch_size == 3 and rows["static"].batch_size == 1
    weights_part.save(net, tmp_path / "ckpt")
    again = hypernet(qwen, 2, kind="perceiver")
    weights_part.load(again, tmp_path / "ckpt")
    with torch.no_grad():
        reloaded = again(states)
    for name, (a, b) in fused.factors.items():
        assert torch.equal(a, reloaded.factors[name][0]) and torch.equal(b, reloaded.factors[name][1])


def test_a_recipe_with_it_patches_down_proj_by_default_and_starts_as_the_receiver(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", "generator.kind=perceiver",
                                               "generator.d_model=32"])
    team = tflow.load(recipe)
    assert team.receiver.generator.spec.targets == ("down_proj",)
    query, document = "What is the secret code of Lisbon?", {"reader": "The secret code of Lisbon is 482."}
    assert team.communicate(query, contexts=[document]).text == team.communicate(query, channel="none").text


def test_tiny_senders_on_another_backbone_are_read_per_layer(qwen, tok):
    other_tok = tiny.tokenizer(vocab_size=384)
    narrow = tiny.model(other_tok, arch="llama", hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, seed=2)
    senders = [Sender(narrow, other_tok, "You extract knowledge.", name="extractor"),
               Sender(qwen, tok, "You are a strategist.", name="strategist")]
    recipe = load_recipe({"model": {"path": "tiny"}, "senders": [{"name": "extractor", "role": "A."},
                                                                 {"name": "strategist", "role": "B."}],
                          "generator": {**SMALL, "rank": 2, "head_scale": 1.0}})
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    net = weights_part.build(recipe, senders, receiver)
    perturb(net, seed=1, std=0.05)
    states = encode(senders, ["What is the secret code?", "Hi"])
    cond, mask = net.condition(states)
    assert cond.shape[:2] == (4, 2) and cond.shape[-1] == 64
    assert torch.equal(cond[:2].abs().sum(-1) > 0, mask[:2, None].expand(-1, 2, -1))  # padding stays zero
    assert net(states).batch_size == 2


def test_state_values_write_the_pointed_at_sender_states_into_b(qwen):
    """B's columns are mixes of the sender's own (normalised) states at that layer, times the B scalars."""
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    gen = make(spec, state_values=True, bias_delta=False)
    cond, mask = condition()
    assert all(torch.count_nonzero(b) == 0 for _, b in gen(cond, mask).values())  # zero-start scalars
    with torch.no_grad():
        gen.detokenizer.scale_b["down_proj"].fill_(1.0)
        gen.point_key.weight.zero_()  # every real position weighs the same: B is the mean of the normalised states
        out = gen(cond, mask)
    unit = torch.nn.functional.normalize(cond, dim=-1)
    for layer, name in enumerate(spec.module_names):
        a, b = out[name]
        assert a.shape == (3, 3, 128) and b.shape == (3, 64, 3)
        for row in range(3):
            mean = unit[row, layer, mask[row]].mean(0)
            torch.testing.assert_close(b[row], mean[:, None].expand(-1, 3), atol=1e-6, rtol=1e-5)


def test_state_values_change_with_the_sender_states_and_ignore_padding(qwen):
    spec = ReceiverSpec.from_model(qwen, ["down_proj"])
    gen = make(spec, state_values=True)
    perturb(gen, seed=1, std=0.1)
    cond, mask = condition()
    padded = torch.cat([cond, torch.full((3, 2, 4, 64), 1e4)], dim=2)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain, right, other = gen(cond, mask), gen(padded, padded_mask), gen(condition(seed=1)[0], mask)
    for name in spec.module_names:
        torch.testing.assert_close(plain[name][1], right[name][1], atol=1e-5, rtol=0)
        assert not torch.allclose(plain[name][1], other[name][1])


def test_state_values_refuse_targets_off_the_residual_stream_and_no_scalars(qwen):
    with pytest.raises(TargetError, match=r"generator.state_values writes the senders' states \(width 64\) into B, "
                                          r"but up_proj do not write the residual stream"):
        make(ReceiverSpec.from_model(qwen, ["down_proj", "up_proj"]), state_values=True)
    with pytest.raises(RecipeError, match="generator.state_values: needs rank_scalars: true"):
        make(ReceiverSpec.from_model(qwen, ["down_proj"]), state_values=True, rank_scalars=False)
