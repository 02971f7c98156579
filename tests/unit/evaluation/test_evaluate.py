"""evaluate: the ledger against independent counts, batched calls, channel checks and refused deltas."""

import pytest
import torch

from tflow import Receiver, ReceiverSpec, Sender
from tflow.channels import text_turn
from tflow.channels.weights.part import build as build_hypernetwork
from tflow.config.recipe import load_recipe
from tflow.errors import ChannelError
from tflow.evaluation.evaluate import evaluate, parse_channels
from tflow.tasks import relay
from tflow.team import Team

RECIPE = {
    "model": {"path": "tiny"},
    "senders": [{"name": "reader", "role": "Read the document and pass on the fact the question needs."}],
    "receiver": {"name": "executor", "system_prompt": "Answer with the value only."},
    "generator": {"kind": "mlp", "rank": 2, "d_model": 32, "depth": 1, "heads": 2},
    "generate": {"max_new_tokens": 4, "message_tokens": 3},
}
STAGES = {"none": {"receiver"}, "text": {"senders", "receiver"}, "weights": {"senders", "generator", "receiver"}}


@pytest.fixture(scope="module")
def team(qwen, tok):
    recipe = load_recipe(RECIPE)
    senders = [Sender(qwen, tok, s.role, s.name) for s in recipe.senders]
    receiver = Receiver(qwen, tok, recipe.receiver.system_prompt, name=recipe.receiver.name)
    receiver.generator = build_hypernetwork(recipe, senders, receiver)
    return Team(senders, receiver, recipe)


@pytest.fixture(scope="module")
def examples():
    return relay.generate(5, seed=0, senders=["reader"])


def count(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("channel", ["none", "text", "weights"])
def test_ledger_equals_independent_counts_and_kv_formula(team, tok, qwen, examples, channel):
    example, (sender,), receiver = examples[0], team.senders, team.receiver
    query = relay.Relay().prompt(example)
    reply = team.communicate(query, channel=channel, contexts=[example.contexts])
    by = reply.usage.by_agent
    expected = {"executor": count(tok, receiver.prompt(text_turn(query, reply.messages)))}
    if channel != "none":
        expected["reader"] = count(tok, sender.prompt(query, example.contexts["reader"]))
    assert {name: u.prompt_tokens for name, u in by.items()} == expected
    assert 1 <= by["executor"].generated_tokens <= 4
    if channel != "none":
        assert by["reader"].generated_tokens <= {"text": 3, "weights": 0}[channel]  # senders write only in text
    assert reply.usage.total_tokens == sum(expected.values()) + sum(u.generated_tokens for u in by.values())
    c = qwen.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # float32
    assert per_token == 512
    assert {name: u.kv_cache_bytes for name, u in by.items()} == {name: per_token * u.total_tokens for name, u in by.items()}
    assert reply.usage.kv_cache_bytes == per_token * reply.usage.total_tokens
    assert set(reply.timings) == set(reply.peak_memory_bytes) == STAGES[channel]
    assert all(peak is None for peak in reply.peak_memory_bytes.values())  # CPU: no CUDA peak to report
    if channel == "weights":  # one sender's rank-2 factors A [2, in] and B [out, 2] per targeted linear
        spec = ReceiverSpec.from_model(qwen)
        assert reply.message_bytes == 4 * 2 * sum(m.in_features + m.out_features for m in spec.modules)
    else:  # 2-byte token ids: the vocabulary has 512 entries
        assert reply.message_bytes == 2 * sum(count(tok, m) for m in reply.messages.values())


def test_short_message_budget_grows_receiver_prompt_by_exactly_the_framed_messages(team, tok, examples):
    example, receiver = examples[1], team.receiver
    query = relay.Relay().prompt(example)
    torch.manual_seed(0)  # greedy, the tiny model writes only whitespace; hot sampling writes tokens
    text = team.communicate(query, channel="text", message_tokens=3, do_sample=True, temperature=3.0,
                            contexts=[example.contexts])
    none = team.communicate(query, channel="none")
    assert list(text.messages) == ["reader"] and text.messages["reader"]
    assert text.usage.by_agent["reader"].generated_tokens <= 3
    assert text.message_bytes == 2 * count(tok, text.messages["reader"])
    framed = receiver.prompt(text_turn(query, text.messages))
    growth = text.usage.by_agent["executor"].prompt_tokens - none.usage.by_agent["executor"].prompt_tokens
    assert growth == count(tok, framed) - count(tok, receiver.prompt(query)) > 0


def test_evaluate_adds_up_every_reply_and_each_call_once(team, examples, monkeypatch):
    task = relay.Relay()
    calls = []
    original = team.communicate

    def recording(*args, **kwargs):
        replies = original(*args, **kwargs)
        calls.append((kwargs["channel"], replies))
        return replies

    monkeypatch.setattr(team, "communicate", recording)
    result = evaluate(team, task, examples, "none,text,weights", batch_size=2)
    monkeypatch.undo()
    assert result.task == "relay" and result.n == 5 and list(result.channels) == ["none", "text", "weights"]
    for channel, r in result.channels.items():
        batches = [replies for name, replies in calls if name == channel]
        assert [len(b) for b in batches] == [2, 2, 1]
        replies = [reply for batch in batches for reply in batch]
        alone = [team.communicate(task.prompt(ex), channel=channel, contexts=[ex.contexts]) for ex in examples]
        assert [a.usage for a in alone] == [b.usage for b in replies]  # batching changes no count
        assert r.accuracy == sum(task.score(a.text, ex) for a, ex in zip(alone, examples, strict=True)) / 5
        # each agent's kept role prefix is charged once, at the longest length a reply read it at
        prefix = {name: max(a.usage.by_agent[name].cached_tokens for a in alone) for name in alone[0].usage.by_agent}
        assert r.prefix_tokens == prefix
        assert r.tokens_by_agent == {name: sum(a.usage.by_agent[name].processed_tokens for a in alone) + prefix[name]
                                     for name in alone[0].usage.by_agent}
        assert r.tokens == sum(a.usage.processed_tokens for a in alone) + sum(prefix.values())
        assert r.tokens == sum(p.tokens for p in r.predictions)
        assert r.cached_tokens == sum(a.usage.cached_tokens for a in alone)
        if channel in ("text", "weights"):  # both channels' senders read the reader's role from kept states
            assert prefix["reader"] > 0 and prefix.get("executor", 0) == 0
        assert r.tokens_by_stage["receiver"] == r.tokens_by_agent["executor"]
        assert r.tokens_by_stage["senders"] == r.tokens_by_agent.get("reader", 0)
        assert r.kv_cache_bytes == sum(a.usage.kv_cache_bytes for a in alone)
        assert r.message_bytes == sum(b.message_bytes for b in replies)
        assert r.seconds_by_stage == {s: sum(b[0].timings[s] for b in batches) for s in STAGES[channel]}
        assert r.seconds == pytest.approx(sum(r.seconds_by_stage.values()))
        assert [(p.index, p.question, p.gold) for p in r.predictions] == [(i, ex.question, ex.answer)
                                                                           for i, ex in enumerate(examples)]
    # a fresh generator is an exact no-op: weights answers exactly like none, at a higher cost
    none, weights = result.channels["none"], result.channels["weights"]
    assert [p.reply for p in weights.predictions] == [p.reply for p in none.predictions]
    assert weights.tokens > none.tokens


def test_unknown_channel_fails_before_anything_runs(team, examples, monkeypatch):
    monkeypatch.setattr(team, "communicate", lambda *a, **k: pytest.fail("ran a channel"))
    with pytest.raises(ChannelError, match=r"unknown channel\(s\) 'smoke'; choose from: none, text, weights"):
        evaluate(team, relay.Relay(), examples, ["none", "smoke"])


def test_parse_channels():
    assert parse_channels(" none, text,,none ") == ["none", "text"]
    assert parse_channels(["weights"]) == ["weights"]
    with pytest.raises(ChannelError, match="no channel given"):
        parse_channels(" , ")


def test_refused_deltas_are_counted_in_the_report(qwen, tok, examples, tmp_path):
    from tflow.evaluation.report import write_report

    recipe = load_recipe({**RECIPE, "generator": {**RECIPE["generator"], "max_delta_norm": 1e-6}})
    senders = [Sender(qwen, tok, s.role, s.name) for s in recipe.senders]
    receiver = Receiver(qwen, tok, recipe.receiver.system_prompt, name=recipe.receiver.name)
    receiver.generator = build_hypernetwork(recipe, senders, receiver)
    with torch.no_grad():
        for p in receiver.generator.parameters():
            p.add_(0.5)  # every B head non-zero: every delta's norm is far above 1e-6
    result = evaluate(Team(senders, receiver, recipe), relay.Relay(), examples, ["none", "weights"])
    assert result.channels["weights"].refused_deltas == len(examples)
    assert result.channels["none"].refused_deltas == 0
    report = write_report(result, tmp_path)
    assert report["channels"]["weights"]["refused_deltas"] == len(examples)
    import json

    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["delta_applied"] for r in rows if r["channel"] == "weights"] == [False] * len(examples)
    none = [r["reply"] for r in rows if r["channel"] == "none"]
    assert [r["reply"] for r in rows if r["channel"] == "weights"] == none  # refused = answered without


def test_a_recipe_data_section_keeps_the_tasks_own_columns():
    # HumanEval's question is its `prompt` column: a data section that names no fields must not
    # ask for `question`/`answer` columns (it did, and `tflow eval` on such a recipe failed).
    from tflow import tasks
    from tflow.training.data import eval_examples

    recipe = load_recipe("recipes/smollm2-humaneval.yaml")
    (example,) = eval_examples(recipe, tasks.get("humaneval"), limit=1)
    assert example.question.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert example.meta["entry_point"] == "has_close_elements"
    renamed = load_recipe("recipes/smollm2-humaneval.yaml", ["data.fields.question=task_id"])
    assert eval_examples(renamed, tasks.get("humaneval"), limit=1)[0].question == "HumanEval/0"
