"""Heterogeneous teams around the real SmolLM2-135M-Instruct (30 layers, hidden 576): a tiny Llama
sender to the real receiver, and the real sender to a tiny Qwen3 receiver."""

from pathlib import Path

import pytest
import torch

import tflow
from tflow import Receiver, Sender
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.channels.weights.part import build as build_hypernetwork
from tflow.config.recipe import load_recipe
from tflow.tasks import relay

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "smollm2-relay.yaml"


@pytest.fixture(scope="module")
def examples():
    return relay.generate(2, seed=11, senders=("reader_a", "reader_b"), format="documents")


@pytest.fixture(scope="module")
def tiny_to_real(tmp_path_factory):
    """reader_a on a tiny Llama (hidden 32, its own vocabulary), reader_b and the receiver on SmolLM2;
    no copy head, which needs the receiver's tokenizer."""
    tmp = tmp_path_factory.mktemp("het")
    llama = (f"{{path: {tmp}/llama, tiny: {{arch: llama, hidden_size: 32, num_layers: 2, num_heads: 2, "
             "num_kv_heads: 1, vocab_size: 384}}")
    return tflow.load(RECIPE, overrides=[f"model.cache_dir={ROOT / 'runs' / 'models' / 'gguf'}",
                                         f"senders.0.model={llama}", "generator.copy_head=false"])


@pytest.fixture(scope="module")
def real_to_tiny(tiny_to_real, tmp_path_factory):
    """reader_a on SmolLM2, reader_b and the receiver on a tiny Qwen3 (hidden 64)."""
    real, real_tok = tiny_to_real.receiver.model, tiny_to_real.receiver.tokenizer
    tok = tiny.tokenizer()
    small = tiny.model(tok, hidden_size=64, num_layers=2, seed=0)
    recipe = tiny_to_real.recipe
    senders = [Sender(real, real_tok, recipe.senders[0].role, "reader_a", context_position="after_query"),
               Sender(small, tok, recipe.senders[1].role, "reader_b", context_position="after_query")]
    receiver = Receiver(small, tok, recipe.receiver.system_prompt, name="executor")
    receiver.generator = build_hypernetwork(load_recipe(recipe.to_dict()), senders, receiver)
    return senders, receiver


def ask(senders, receiver, examples, channel):
    queries = [relay.Relay().prompt(e) for e in examples]
    contexts = [e.contexts for e in examples]
    return tflow.communicate(senders, receiver, queries, channel=channel, contexts=contexts, max_new_tokens=8)


def perturbed(net):
    """Noise on every parameter (B heads more), so the deltas change answers; returns the saved state."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if ".b." in name else 0.05))
    return saved


@pytest.mark.parametrize("which", ["tiny_to_real", "real_to_tiny"])
def test_fresh_generator_is_a_no_op_and_a_query_alone_equals_it_in_a_batch(which, request, examples):
    made = request.getfixturevalue(which)
    senders, receiver = (made.senders, made.receiver) if which == "tiny_to_real" else made
    net = receiver.generator
    widths = [s.model.config.hidden_size for s in senders]
    assert net.config["sender_hidden"] == widths and sorted(net.projection) == [str(widths.index(min(widths)))]
    queries = [relay.Relay().prompt(e) for e in examples]
    contexts = [[e.contexts[s.name] for e in examples] for s in senders]
    with torch.no_grad():
        assert torch.equal(net(encode(senders, queries, contexts)).row_norms(), torch.zeros(len(examples)))
    none = ask(senders, receiver, examples, "none")
    assert [r.text for r in ask(senders, receiver, examples, "weights")] == [r.text for r in none]
    saved = perturbed(net)
    try:
        batched = ask(senders, receiver, examples, "weights")
        alone = [ask(senders, receiver, [e], "weights")[0] for e in examples]
    finally:
        net.load_state_dict(saved)
    assert [(r.text, r.usage) for r in batched] == [(r.text, r.usage) for r in alone]
    assert [r.text for r in batched] != [r.text for r in none]
    assert all(r.delta_applied for r in batched)
