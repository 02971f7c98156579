"""The receiver families past Qwen3/Llama (Gemma 2, Gemma 3 text, Phi-3, OLMo 2) on tiny random models."""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from conftest import hypernet, merged_copy, perturb, random_delta
from helpers import PROMPTS, batch, logits
from typer.testing import CliRunner

import tflow
from tflow import ReceiverSpec, Sender, patched
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.backbones.families import ALL_TARGETS
from tflow.channels.weights import part as weights_part
from tflow.cli import app
from tflow.config.sections import TinySection
from tflow.errors import TargetError
from tflow.lora.patching import attach, detach
from tflow.training.data import teacher_forced

PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class Family:
    arch: str
    model: torch.nn.Module
    folder: Path


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "phi3", "olmo2"])
def family(request, tok, tmp_path_factory) -> Family:
    """A tiny random model of the family, frozen, and saved with the tiny tokenizer into a folder."""
    model = tiny.model(tok, arch=request.param, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=4)
    model.requires_grad_(False)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Family(request.param, model, folder)


def test_spec_finds_the_family_layout(family):
    spec = ReceiverSpec.from_model(family.model)
    assert spec.architecture == tiny.ARCHS[family.arch][1]
    kinds = PHI3 if family.arch == "phi3" else ALL_TARGETS
    assert spec.targets == kinds and [m.kind for m in spec.modules if m.layer == 1] == list(kinds)
    named = dict(family.model.named_modules())
    for m in spec.modules:
        assert (named[m.name].in_features, named[m.name].out_features) == (m.in_features, m.out_features)
    # the seven part names give the same modules: on Phi-3 they name the fused ones
    assert ReceiverSpec.from_model(family.model, ALL_TARGETS) == spec


def test_phi3_part_names_target_their_fused_module(tok):
    model = tiny.model(tok, arch="phi3", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    spec = ReceiverSpec.from_model(model, ["v_proj", "up_proj", "qkv_proj"], layers=[0])
    assert spec.targets == ("qkv_proj", "gate_up_proj")
    assert spec.module_names == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]
    assert spec.modules[0].out_features == (2 + 2 * 1) * 16  # 2 query heads and one k, one v head of 16


def test_patched_forward_equals_merged_weights(family, tok):
    ids, mask = batch(tok)
    delta = random_delta(family.model, batch=4, seed=1)
    with patched(family.model, delta):
        out = logits(family.model, ids, mask)
    for row in range(4):
        keep = mask[row].bool()
        alone = logits(merged_copy(family.model, delta, row), ids[row, keep][None], mask[row, keep][None])
        diff = (out[row, keep] - alone[0]).abs().max().item()
        assert diff < 1e-4, f"row {row}: max abs diff {diff}"


def test_beams_with_a_per_row_delta_equal_the_merged_model(family, tok):
    model = family.model
    ids, mask = batch(tok, PROMPTS[:2])
    delta = random_delta(model, batch=2, std=0.3, seed=3)
    gen = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=tok.pad_token_id)
    with patched(model, delta), torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    assert not torch.equal(new, plain), "the delta should change the generation"
    for row in range(2):
        keep = mask[row].bool()
        with torch.no_grad():
            ref = merged_copy(model, delta, row).generate(
                input_ids=ids[row, keep][None], attention_mask=mask[row, keep][None], **gen)[:, keep.sum():]
        for k in range(2):
            got = new[row * 2 + k][: ref.shape[1]]
            assert torch.equal(got, ref[k]), f"row {row} beam {k}: {got} vs {ref[k]}"


def test_restored_bit_exactly(family, tok):
    ids, mask = batch(tok)
    before = logits(family.model, ids, mask)
    with patched(family.model, random_delta(family.model, batch=4, seed=2)):
        assert not torch.equal(logits(family.model, ids, mask), before)
    assert torch.equal(logits(family.model, ids, mask), before)


def test_one_generator_step_trains_through_the_receiver(family, tok):
    model = copy.deepcopy(family.model).train()
    senders = [Sender(model, tok, "You extract knowledge.", name="reader", context="The secret code of Lisbon is 482.")]
    net = hypernet(model, 1, seed=1).train()
    queries = ["What is the secret code of Lisbon?", "Hi"]
    ids, mask, labels = teacher_forced(tok, queries, ["482", "Hello"], max_length=64)

    def loss():
        attach(model, net(encode(senders, queries)), validate=False)
        try:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        finally:
            detach(model)

    before = loss()
    before.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values()), \
        [name for name, g in grads.items() if g is None or not torch.count_nonzero(g)]
    assert all(p.grad is None for p in model.parameters())  # the receiver stays frozen
    torch.optim.SGD(net.parameters(), lr=1e-4).step()
    with torch.no_grad():
        assert loss().item() < before.item()  # a small step down the gradient lowers the loss


def test_ask_through_a_recipe(family, tmp_path):
    recipe = {
        "model": {"path": str(family.folder), "device": "cpu"},
        "senders": [{"name": "reader", "role": "Read the document and pass on the fact."}],
        "receiver": {"name": "executor"},
        "generator": {"kind": "mlp", "rank": 2, "d_model": 16, "depth": 1, "heads": 2, "head_scale": 1.0},
        "generate": {"max_new_tokens": 4, "message_tokens": 4},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    team = tflow.load(tmp_path / "recipe.yaml")
    assert type(team.receiver.model).__name__ == tiny.ARCHS[family.arch][1]
    perturb(team.receiver.generator, seed=1)
    weights_part.save(team.receiver.generator, tmp_path / "ckpt")
    question = "What is the secret code of Lisbon?"
    result = CliRunner().invoke(app, ["ask", str(tmp_path / "recipe.yaml"), question, "--checkpoint",
                                      str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    expected = team.communicate(question)
    assert result.stdout == expected.text + "\n"
    assert result.stderr.startswith(f"[weights] tokens {expected.usage.total_tokens} ")
    u = expected.usage
    assert f"of which cached {u.cached_tokens}, generated {u.generated_tokens}; processed {u.processed_tokens})" \
        in result.stderr and u.cached_tokens > 0
    assert expected.text != team.communicate(question, channel="none").text


@pytest.mark.parametrize("target, kind", [("qkv_proj", "Phi-3"), ("gate_up_proj", "Phi-3")])
def test_a_target_of_another_family_names_the_receivers_family_and_linears(llama, target, kind):
    with pytest.raises(TargetError) as err:
        ReceiverSpec.from_model(llama, ["q_proj", target])
    assert str(err.value) == (
        f"target modules ['{target}'] do not exist in this Llama model (LlamaForCausalLM; {target} is a {kind} "
        "kind); its linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")


def test_an_unknown_layout_needs_targets_named_by_hand():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TargetError) as err:
        ReceiverSpec.from_model(model)
    assert str(err.value) == (
        "GPTNeoXForCausalLM is not a receiver layout tflow knows (Qwen3, Qwen2, Llama, Mistral, Gemma 2, "
        "Gemma 3 (text), Phi-3, OLMo 2); name the linear modules to patch by hand (recipe generator.targets "
        "and kv.targets, or targets=), from: query_key_value, dense, dense_h_to_4h, dense_4h_to_h")
    with pytest.raises(TargetError, match=r"^target modules \['q_proj'\] do not exist in this model "
                       r"\(GPTNeoXForCausalLM\); its linear modules are: query_key_value, dense, "):
        ReceiverSpec.from_model(model, ["q_proj"])
    spec = ReceiverSpec.from_model(model, ["query_key_value", "dense_4h_to_h"])
    assert spec.module_names[:2] == ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.mlp.dense_4h_to_h"]


def test_a_tiny_recipe_accepts_every_family():
    assert set(get_args(TinySection.model_fields["arch"].annotation)) == set(tiny.ARCHS)
