"""The copy head: one rank per sender token on the receiver's LM head, keyed by the state before it."""

import csv
import json

import pytest
import torch
from conftest import perturb

import tflow
from tflow import Receiver, Sender
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.channels.weights.diagnostics import ablate, sender_deltas
from tflow.channels.weights.part import build as build_hypernetwork
from tflow.config.recipe import load_recipe
from tflow.errors import AblationError, CheckpointError, RecipeError
from tflow.lora.onehot import dense
from tflow.training import checkpoint
from tflow.training.loop import train

QUERIES = ["What is the secret code of Lisbon?", "Hi", "What is the password of Oslo?"]
CONTEXTS = ["The secret code of Lisbon is 482.", "The password of Oslo is tiger.", None]
GENERATOR = {"kind": "mlp", "rank": 2, "d_model": 32, "depth": 1, "heads": 2, "head_scale": 1.0, "copy_head": True}


def recipe_dict(**generator):
    return {"model": {"path": "tiny"}, "senders": [{"name": "reader", "role": "A."}, {"name": "helper", "role": "B."}],
            "generator": {**GENERATOR, **generator}}


@pytest.fixture
def team(qwen, tok):
    senders = [Sender(qwen, tok, "You read.", name="reader"), Sender(qwen, tok, "You help.", name="helper")]
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        receiver.generator = build_hypernetwork(load_recipe(recipe_dict()), senders, receiver)
    return senders, receiver


def contexts_for(senders, n=3):
    return [[CONTEXTS[q] if s == 0 else None for q in range(n)] for s in range(len(senders))]


def test_a_fresh_copy_head_is_an_exact_no_op(team):
    senders, receiver = team
    delta = receiver.generator(encode(senders, QUERIES, contexts_for(senders)))
    a, b = delta.factors["lm_head"]
    assert torch.count_nonzero(a) == 0 and delta.row_norms().eq(0).all()
    contexts = [{"reader": c} if c else {} for c in CONTEXTS]
    weights = tflow.communicate(senders, receiver, QUERIES, contexts=contexts)
    alone = tflow.communicate(senders, receiver, QUERIES, channel="none")
    assert [r.text for r in weights] == [r.text for r in alone]


def test_each_rank_votes_for_the_next_sender_token_by_the_state_before_it(team):
    senders, receiver = team
    net = receiver.generator
    perturb(net.copy, seed=1)
    states = encode(senders, QUERIES, contexts_for(senders))
    with torch.no_grad():
        cond, mask = net.condition(states)
        a, one_hot = net.copy(cond, mask, states.ids[0], scale=2.0)
    b = dense(one_hot)
    n, t = mask.shape
    assert a.shape == (n, t - 1, 64) and b.shape == (n, 512, t - 1)
    real = mask[:, 1:] & mask[:, :-1]
    ids = states.ids[0]
    for row in range(n):
        for pos in range(t - 1):
            column = b[row, :, pos]
            if real[row, pos]:  # gain / scale on the token that follows, nothing elsewhere
                assert column[ids[row, pos + 1]] == pytest.approx(net.copy.gain.item() / 2.0)
                assert torch.count_nonzero(column) == 1
            else:
                assert torch.count_nonzero(column) == 0 and torch.count_nonzero(a[row, pos]) == 0
    before = cond[:, :-1]
    with torch.no_grad():
        keys = net.copy.key(before * torch.rsqrt(before.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(a[real], keys[real])


def test_the_fused_delta_adds_gain_times_the_vote_to_the_logits(team):
    senders, receiver = team
    net = receiver.generator
    perturb(net.copy, seed=2)
    states = encode(senders, QUERIES[:1], contexts_for(senders, 1))
    delta = net(states)
    a, b = delta.factors["lm_head"]
    b = dense(b)
    x = torch.randn(5, 64)
    cond, mask = net.condition(states)
    gates = net.fusion.gates()
    want = torch.zeros(5, 512)
    for s in range(2):  # sender-major rows of the condition; each sender's votes weighted by its gate
        keys, _ = net.copy(cond[s:s + 1], mask[s:s + 1], states.ids[0][s:s + 1], 1.0)
        votes = x @ keys[0].T  # [5, T-1]
        ids = states.ids[0][s, 1:]
        real = (mask[s, 1:] & mask[s, :-1]).float()
        want += gates[s] * net.copy.gain * torch.zeros(5, 512).index_add_(1, ids, votes * real)
    got = delta.scale * x @ (b[0] @ a[0]).T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)


def test_a_query_gets_the_same_copy_factors_alone_and_in_a_batch(team):
    senders, receiver = team
    perturb(receiver.generator, seed=3)
    together = receiver.generator(encode(senders, QUERIES, contexts_for(senders)))
    for q in range(len(QUERIES)):
        alone = receiver.generator(encode(senders, QUERIES[q:q + 1], contexts_for(senders, 1) if q == 0 else
                                          [[CONTEXTS[q]], [None]]))
        a1, b1 = alone.factors["lm_head"]
        a2, b2 = together.factors["lm_head"]
        full = (dense(b2)[q] @ a2[q])
        assert torch.allclose(dense(b1)[0] @ a1[0], full, atol=1e-5)


def test_copy_head_needs_param_tokens_or_mlp_and_one_tokenizer(qwen, tok):
    with pytest.raises(RecipeError, match="copy_head: not available with kind basis"):
        load_recipe(recipe_dict(kind="basis"))
    other_tok = tiny.tokenizer(vocab_size=384)
    other = tiny.model(other_tok, hidden_size=64, num_layers=2, seed=4)
    senders = [Sender(other, other_tok, "You read.", name="reader"), Sender(qwen, tok, "You help.", name="helper")]
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    with pytest.raises(RecipeError, match="sender 'reader' tokenizes differently from the receiver"):
        build_hypernetwork(load_recipe(recipe_dict()), senders, receiver)


def test_training_with_a_copy_head_learns_and_its_checkpoint_refuses_a_recipe_without(tmp_path):
    args = [f"model.path={tmp_path}/model", f"train.out_dir={tmp_path}/out", "train.max_steps=30", "train.val_every=10",
            "data.relay.n_train=256", "data.relay.n_test=32", "generator.copy_head=true"]
    result = train(load_recipe("recipes/tiny.yaml", args), progress=False)
    losses = [float(r["val_loss"]) for r in csv.DictReader(open(result.out_dir / "metrics.csv")) if r["val_loss"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
    trained = result.team.receiver.generator
    assert torch.count_nonzero(trained.copy.key.weight) > 0
    loaded = tflow.load(load_recipe("recipes/tiny.yaml", args), checkpoint=result.out_dir)
    assert torch.equal(loaded.receiver.generator.copy.key.weight, trained.copy.key.weight)
    without = load_recipe("recipes/tiny.yaml", args[:-1])
    with pytest.raises(CheckpointError, match="copy_head"):
        tflow.load(without, checkpoint=result.out_dir)
    assert checkpoint.trained_parts(result.out_dir)


def test_a_copy_head_delta_exports_to_peft_with_its_own_rank_and_the_same_logits(tmp_path):
    import copy
    import warnings

    from peft import PeftModel

    from tflow.channels.weights.export import export_adapter, query_delta

    args = [f"model.path={tmp_path}/model", f"train.out_dir={tmp_path}/out", "generator.copy_head=true"]
    team = tflow.load(load_recipe("recipes/tiny.yaml", args))
    perturb(team.receiver.generator, seed=5)
    contexts = {"reader": "The password of Oslo is tiger."}
    query = "What is the password of Oslo?"
    export_adapter(team, query, tmp_path / "adapter", contexts)
    delta = query_delta(team, query, contexts)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    copy_rank = delta.factors["lm_head"][0].shape[1]
    rank = delta.factors["model.layers.0.self_attn.q_proj"][0].shape[1]
    assert copy_rank > rank and config["r"] == rank and config["rank_pattern"] == {"lm_head": copy_rank} == config["alpha_pattern"]
    receiver = team.receiver
    ids = receiver.tokenizer([receiver.prompt(query)], return_tensors="pt")
    with torch.no_grad():
        with tflow.patched(receiver.model, delta):
            patched = receiver.model(**ids).logits
        with warnings.catch_warnings():  # every warning an error but peft's caution about a tied LM head:
            warnings.simplefilter("error")  # the adapter changes the logits only, never the input embeddings
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
            peft = PeftModel.from_pretrained(copy.deepcopy(receiver.model), str(tmp_path / "adapter")).eval()
        served = peft(**ids).logits
    assert (served - patched).abs().max().item() <= 1e-4


def test_copy_head_and_trunk_ablations_split_the_delta_into_its_two_parts(team):
    senders, receiver = team
    perturb(receiver.generator, seed=3)
    queries = ["What is the secret code of Lisbon?", "What is the password of Oslo?"]
    contexts = [{"reader": CONTEXTS[0]}, {"reader": CONTEXTS[1]}]
    deltas = sender_deltas(senders, receiver, queries, contexts)
    rows = ablate(deltas, ["copy-head", "trunk"])
    fused, head = deltas.fused(), receiver.generator.copy.module
    assert list(rows["copy-head"].factors) == [head]
    assert set(rows["trunk"].factors) == set(fused.factors) - {head} and len(rows["trunk"].factors) > 0
    for name, (a, b) in rows["trunk"].factors.items():
        assert torch.equal(a, fused.factors[name][0]) and torch.equal(b, fused.factors[name][1])


def test_copy_head_and_trunk_need_a_copy_head(qwen, tok):
    senders = [Sender(qwen, tok, "You read.", name="reader")]
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    receiver.generator = build_hypernetwork(load_recipe({**recipe_dict(copy_head=False), "senders": [
        {"name": "reader", "role": "A."}]}), senders, receiver)
    deltas = sender_deltas(senders, receiver, ["Hi"])
    with pytest.raises(AblationError, match=r"this generator has no copy head \(generator.copy_head: false\)"):
        ablate(deltas, ["trunk"])
