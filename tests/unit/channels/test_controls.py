"""The context channel and the trained controls: none, text and context with a receiver LoRA of their own."""

import json

import pytest
import torch
from typer.testing import CliRunner

import tflow
from tflow.channels.context import context_turn
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.evaluation.provenance import checkpoint_provenance
from tflow.training.loop import train

QUERY = "What is the secret code of Lisbon?"
DOC = "The secret code of Lisbon is 482."


def args(tmp, *extra):
    return [f"model.path={tmp}/model", f"train.out_dir={tmp}/out", "train.max_steps=3", "train.val_every=3",
            "train.batch_size=4", "data.relay.n_train=16", "data.relay.n_val=8", "data.relay.n_test=8",
            "generate.max_new_tokens=4", "generate.message_tokens=4", "kv.targets=[q_proj,v_proj]", *extra]


def test_context_puts_every_document_in_the_receivers_own_prompt(tmp_path):
    team = tflow.load(load_recipe("recipes/tiny.yaml", args(tmp_path)))
    reply = team.communicate(QUERY, channel="context", contexts=[{"reader": DOC}])
    alone = team.communicate(QUERY, channel="none")
    assert list(reply.usage.by_agent) == ["executor"] and reply.channel == "context"
    prompt = team.receiver.prompt(context_turn(QUERY, {"reader": DOC}))
    assert DOC in prompt and reply.usage.prompt_tokens == len(team.receiver.tokenizer(prompt)["input_ids"])
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens
    assert context_turn(QUERY, {"reader": None}) == QUERY


@pytest.mark.parametrize("channel", ["none", "context", "text"])
def test_a_control_trains_a_receiver_lora_of_the_kv_size_and_loads_it(tmp_path, channel):
    result = train(load_recipe("recipes/tiny.yaml", args(tmp_path, f"train.channel={channel}")), progress=False)
    assert result.part == tmp_path / "out" / channel / "adapter_model.safetensors" and result.global_step == 3
    assert checkpoint_provenance(tmp_path / "out")["steps"] == {channel: 3}  # from the run's steps.json
    lora = result.team.receiver.parts[channel]
    kv = result.team.receiver.kv_lora
    assert not lora.is_zero() and lora.rank == kv.rank and lora.spec == kv.spec
    team = tflow.load(load_recipe("recipes/tiny.yaml", args(tmp_path)), checkpoint=tmp_path / "out")
    assert team.trained == {channel} and team.label(channel) == f"{channel} trained"
    for (name, a), b in zip(lora.state_dict().items(), team.receiver.parts[channel].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = tflow.load(load_recipe("recipes/tiny.yaml", args(tmp_path)))
    assert fresh.label(channel) == channel


def test_eval_reports_the_untrained_row_beside_the_trained_control(tmp_path):
    train(load_recipe("recipes/tiny.yaml", args(tmp_path, "train.channel=none", "train.lr=0.05")), progress=False)
    result = CliRunner().invoke(app, ["eval", "recipes/tiny.yaml", *args(tmp_path), "--checkpoint",
                                      str(tmp_path / "out"), "--channels", "none,context", "--limit", "4",
                                      "--out", str(tmp_path / "eval"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["channels"]) == ["none@untrained", "none", "context"]
    labels = [c["label"] for c in report["channels"].values()]
    assert labels == ["none", "none trained", "context"]
    fresh = tflow.load(load_recipe("recipes/tiny.yaml", args(tmp_path)))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    untrained = [p["reply"] for p in predictions if p["channel"] == "none@untrained"]
    questions = [p["question"] for p in predictions if p["channel"] == "none@untrained"]
    task = tflow.tasks.get("relay")
    from tflow.tasks import Example

    assert untrained == [fresh.communicate(task.prompt(Example(q, "")), channel="none").text for q in questions]
