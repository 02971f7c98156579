"""tflow demo end to end (shortened): every channel reported, the seed option, the reader's message."""

import json
from dataclasses import replace

import yaml
from typer.testing import CliRunner

from tflow import demo
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.demo import DEMO_RECIPE, DemoSettings, message, run_demo
from tflow.tasks import relay
from tflow.training.data import relay_splits


def test_shortened_demo_runs_end_to_end_and_reports_every_channel(tmp_path):
    settings = DemoSettings(hidden_size=32, pretrain_steps=4, train_steps=2, eval_limit=6, batch_size=8)
    lines = []
    report = run_demo(tmp_path, settings, progress=False, say=lines.append)
    assert [line[:5] for line in lines[:4]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "generator", "model", "predictions.jsonl", "report.json", "report.md", "report.png"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert report["task"] == "relay" and report["n"] == 6
    assert list(report["channels"]) == ["none", "text", "weights", "kv", "latent", "context"]
    for channel in report["channels"].values():
        assert 0.0 <= channel["accuracy"] <= 1.0
        assert channel["tokens"]["total"] > 0 and channel["seconds"] > 0
    assert report["channels"]["weights"]["message_bytes"] > 0
    assert report["channels"]["kv"]["label"] == "kv"  # trained: no longer LatentMAS
    for part in ("generator.safetensors", "kv/adapter_model.safetensors", "latent.safetensors"):
        assert (tmp_path / "generator" / part).is_file()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 36


def test_demo_seed_option_reaches_the_recipe_and_keeps_the_held_out_facts(tmp_path, monkeypatch):
    def shortened(out, settings, **kwargs):
        return run_demo(out, replace(settings, hidden_size=32, batch_size=8), **kwargs)

    monkeypatch.setattr(demo, "run_demo", shortened)
    result = CliRunner().invoke(app, [
        "demo", "--seed", "3", "--pretrain-steps", "4", "--train-steps", "2", "--eval-limit", "6",
        "--threads", "2", "--no-progress", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((tmp_path / "generator" / "recipe.yaml").read_text())
    assert recipe["seed"] == 3
    questions = [json.loads(line)["question"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    held_out = relay_splits(load_recipe(DEMO_RECIPE))[2][:6]
    assert questions[:6] == [ex.question for ex in held_out]


def test_reader_message_states_the_fact_and_the_answer():
    ex = relay.generate(1, 3)[0]
    note = message(ex)
    assert ex.contexts["reader"].removesuffix(".").split(" is ")[0].lower() in note.lower()
    assert note.endswith(f"So the answer to the question is {ex.answer}.")
