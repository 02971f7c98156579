"""Heterogeneous teams: senders on other backbones (width, depth, tokenizer, chat template) than the
receiver and than each other."""

import csv

import pytest
import torch
from conftest import perturb

import tflow
from tflow import Receiver, Sender, communicate
from tflow.agents.encoding import encode
from tflow.backbones import tiny
from tflow.channels.weights import part as weights_part
from tflow.channels.weights.part import build as build_hypernetwork
from tflow.config.recipe import load_recipe
from tflow.errors import CheckpointError, ModelLoadError
from tflow.training.loop import train

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]
PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:\n{% endif %}")
GENERATOR = {"kind": "mlp", "rank": 2, "d_model": 32, "depth": 1, "heads": 2, "head_scale": 1.0}


@pytest.fixture(scope="module")
def llama_tok():
    """Another vocabulary and another chat template than the receiver's."""
    tok = tiny.tokenizer(vocab_size=384)
    tok.chat_template = PLAIN_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def narrow_llama(llama_tok):
    """A Llama-layout sender backbone, narrower and deeper than the tiny Qwen3 receiver (32 x 3 vs 64 x 2)."""
    return tiny.model(llama_tok, arch="llama", hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, seed=2)


def mixed_senders(qwen, tok, narrow_llama, llama_tok):
    """A Llama sender with a private fact, then a Qwen3 sender on the receiver's own backbone."""
    return [Sender(narrow_llama, llama_tok, "You extract knowledge.", name="extractor",
                   context="The secret code of Lisbon is 482."),
            Sender(qwen, tok, "You are a strategist.", name="strategist")]


def recipe_dict(**generator):
    return {"model": {"path": "tiny"}, "senders": [{"name": "extractor", "role": "A."}, {"name": "strategist", "role": "B."}],
            "generator": {**GENERATOR, **generator}}


@pytest.fixture
def team(qwen, tok, narrow_llama, llama_tok):
    senders = mixed_senders(qwen, tok, narrow_llama, llama_tok)
    receiver = Receiver(qwen, tok, "You are the executor.", name="executor")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        receiver.generator = build_hypernetwork(load_recipe(recipe_dict()), senders, receiver)
    return senders, receiver


def test_each_backbone_gets_its_own_aggregation_and_the_narrow_one_a_projection(team):
    _, receiver = team
    net = receiver.generator
    names = {k for k in net.state_dict() if not k.startswith("generator.")}
    assert names == {"aggregation.0.layer_logits", "aggregation.0.log_temperature", "aggregation.1.layer_logits",
                     "aggregation.1.log_temperature", "projection.0.weight", "projection.0.bias", "fusion.gate_logits"}
    assert net.aggregation["0"].layer_logits.shape == (4,) and net.aggregation["1"].layer_logits.shape == (3,)
    assert net.projection["0"].weight.shape == (64, 32)
    assert net.config["sender_hidden"] == [32, 64] and net.config["sender_groups"] == [0, 1]
    assert [s["architecture"] for s in net.senders] == ["LlamaForCausalLM", "Qwen3ForCausalLM"]


def test_fresh_generator_answers_exactly_like_none(team):
    senders, receiver = team
    with torch.no_grad():
        assert torch.equal(receiver.generator(encode(senders, QUERIES)).row_norms(), torch.zeros(len(QUERIES)))
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=8)
    weights = communicate(senders, receiver, QUERIES, channel="weights", max_new_tokens=8)
    assert [r.text for r in weights] == [r.text for r in none]
    assert [r.usage.by_agent["executor"] for r in weights] == [r.usage.by_agent["executor"] for r in none]


def test_query_alone_equals_query_in_batch_and_every_sender_counts(team, llama_tok, tok):
    senders, receiver = team
    perturb(receiver.generator, seed=1)
    batch = communicate(senders, receiver, QUERIES, max_new_tokens=8)
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=8)
    for i, q in enumerate(QUERIES):
        alone = communicate(senders, receiver, q, max_new_tokens=8)
        assert (alone.text, alone.usage) == (batch[i].text, batch[i].usage)
    assert [r.text for r in batch] != [r.text for r in none]
    # each sender's prompt is counted in its own tokenizer and chat template
    expected = {s.name: len(s.tokenizer(s.prompt(QUERIES[0]), add_special_tokens=False).input_ids) for s in senders}
    assert {n: batch[0].usage.by_agent[n].prompt_tokens for n in expected} == expected
    assert senders[0].prompt("Hi").startswith("### system:")
    # the Llama sender's states reach the delta: another private fact, another delta
    with torch.no_grad():
        states = encode(senders, QUERIES[:1])
        other = encode(senders, QUERIES[:1], [["The secret code of Lisbon is 917."], [None]])
        assert not torch.allclose(receiver.generator(states).row_norms(), receiver.generator(other).row_norms())


def test_conditions_come_back_sender_major_and_padding_stays_zero(qwen, tok, narrow_llama, llama_tok):
    a, b = mixed_senders(qwen, tok, narrow_llama, llama_tok)
    senders = [b, a, Sender(qwen, tok, "You check the answer.", name="checker")]  # groups 0, 1, 0
    receiver = Receiver(qwen, tok, name="executor")
    net = build_hypernetwork(load_recipe({**recipe_dict(), "senders": [{"name": s.name, "role": "x"} for s in senders]}),
                             senders, receiver)
    perturb(net, seed=2)
    states = encode(senders, QUERIES)
    assert states.groups == (0, 1, 0) and len(states.hiddens) == 2
    with pytest.raises(ModelLoadError, match="2 backbones"):
        states.hidden  # noqa: B018
    with torch.no_grad():
        cond, mask = net.condition(states)
        assert torch.count_nonzero(cond[~mask]) == 0
        for s, sender in enumerate(senders):
            alone = encode([sender], QUERIES)
            group = net.groups[s]
            want = net.aggregation[str(group)](alone.hidden, alone.mask)
            if str(group) in net.projection:
                want = net.projection[str(group)](want).masked_fill(~alone.mask[..., None], 0.0)
            rows = cond[s * len(QUERIES):(s + 1) * len(QUERIES)]
            torch.testing.assert_close(rows[:, :want.shape[1]], want)
            assert torch.equal(mask[s * len(QUERIES):(s + 1) * len(QUERIES), :want.shape[1]], alone.mask)


def test_checkpoint_records_every_sender_backbone_and_refuses_another(team, tmp_path, qwen, tok, llama_tok):
    senders, receiver = team
    perturb(receiver.generator, seed=3)
    weights_part.save(receiver.generator, tmp_path / "ckpt")
    deeper = tiny.model(llama_tok, arch="llama", hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1)
    for other, shown in [(deeper, "LlamaForCausalLM (4 layers, hidden 32"), (qwen, "Qwen3ForCausalLM (2 layers, hidden 64")]:
        swapped = [Sender(other, llama_tok if other is deeper else tok, "You extract knowledge.", name="extractor"), senders[1]]
        net = build_hypernetwork(load_recipe(recipe_dict()), swapped, receiver)
        with pytest.raises(CheckpointError) as err:
            weights_part.load(net, tmp_path / "ckpt")
        message = str(err.value)
        assert "\n" not in message
        assert "sender 'extractor' on LlamaForCausalLM (3 layers, hidden 32, vocabulary" in message
        assert f"this team's sender 'extractor' runs {shown}" in message
    same = build_hypernetwork(load_recipe(recipe_dict()), senders, receiver)
    weights_part.load(same, tmp_path / "ckpt")
    for k, v in receiver.generator.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k


def test_a_checkpoint_without_sender_fingerprints_still_loads(team, tmp_path):
    senders, receiver = team
    receiver.generator.senders = None  # as checkpoints written before sender fingerprints
    weights_part.save(receiver.generator, tmp_path / "old")
    weights_part.load(build_hypernetwork(load_recipe(recipe_dict()), senders, receiver), tmp_path / "old")


def test_a_sender_tokenizer_without_chat_template_is_one_line_naming_the_sender(narrow_llama, tmp_path):
    bare = tiny.tokenizer(vocab_size=384)
    bare.chat_template = None
    with pytest.raises(ModelLoadError, match=r"^sender 'extractor': its tokenizer has no chat template"):
        Sender(narrow_llama, bare, "You extract knowledge.", name="extractor")
    tiny.build(tmp_path / "plain", vocab_size=384, arch="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", f"senders.0.model={{path: {tmp_path}/plain}}"])
    with pytest.raises(ModelLoadError) as err:
        tflow.load(recipe)
    assert str(err.value) == (f"senders.0.model.path: the tokenizer of '{tmp_path}/plain' (for sender 'reader') has no "
                              "chat template; use a chat/instruct model")


def test_a_llama_sender_and_a_qwen3_sender_teach_a_wider_qwen3_receiver(tmp_path):
    llama = (f"{{path: {tmp_path}/sender, tiny: {{arch: llama, hidden_size: 32, num_layers: 3, num_heads: 2, "
             "num_kv_heads: 1, vocab_size: 384, seed: 1}}")
    rec = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", f"train.out_dir={tmp_path}/out",
                                            f"senders.0.model={llama}", "senders.1={name: helper, role: Read it.}",
                                            "train.val_every=10", "train.max_steps=40", "data.relay.n_train=256",
                                            "data.relay.n_test=32"])
    result = train(rec, progress=False)
    team = result.team
    assert type(team.senders[0].model).__name__ == "LlamaForCausalLM" and len(team.senders[0].tokenizer) == 384
    assert team.senders[1].model is team.receiver.model and team.receiver.model.config.hidden_size == 64
    assert team.receiver.generator.config["sender_hidden"] == [32, 64]
    rows = list(csv.DictReader(open(result.out_dir / "metrics.csv")))
    losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert losses[-1] < losses[0] - 0.1, losses
    loaded = tflow.load(rec, checkpoint=result.out_dir)
    for k, v in team.receiver.generator.state_dict().items():
        assert torch.equal(loaded.receiver.generator.state_dict()[k], v), k
    questions = ["What is the secret code of Lisbon?", "What is the password of Oslo?"]
    contexts = [{"reader": "The secret code of Lisbon is 123."}, {"helper": "The password of Oslo is tiger."}]
    assert [r.text for r in loaded.communicate(questions, contexts=contexts)] == \
        [r.text for r in team.communicate(questions, contexts=contexts)]
