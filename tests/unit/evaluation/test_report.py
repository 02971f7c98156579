"""Reports: report.json, report.md, report.png and predictions.jsonl agree; intervals, provenance and
warnings; the eval CLI and its mistakes."""

import hashlib
import json
import pickle
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
import torch
from conftest import recipe_args
from typer.testing import CliRunner

import tflow
from tflow.channels.weights import part as weights_part
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import OutputError
from tflow.evaluation import provenance as provenance_module
from tflow.evaluation.evaluate import ChannelResult, EvalResult, Failure
from tflow.evaluation.provenance import provenance
from tflow.evaluation.report import COLUMNS, REPORT_FILES, headers, render_table, write_report
from tflow.evaluation.stats import bootstrap_interval, paired_difference
from tflow.reply import AgentUsage, Reply, Usage
from tflow.tasks import relay

runner = CliRunner()
# (channel, sender tokens per query, receiver tokens per query, stage seconds per call)
CHANNELS = [("none", 0, 50, {"receiver": 1.0}), ("text", 150, 90, {"senders": 3.0, "receiver": 2.0}),
            ("weights", 40, 50, {"senders": 0.5, "generator": 0.25, "receiver": 1.25})]


def fake_result(channels=CHANNELS) -> EvalResult:
    """4 relay examples per channel, in two calls of 2; examples 0 and 2 answered right."""
    examples, task = relay.generate(4, seed=0, senders=["reader"]), relay.Relay()
    results = {}
    for name, sent, received, timings in channels:
        result = results[name] = ChannelResult(name)
        for start in (0, 2):
            replies = []
            for i in (start, start + 1):
                ledger = {"executor": AgentUsage(received - 2, 2)} | ({"reader": AgentUsage(sent)} if sent else {})
                text = examples[i].answer if i % 2 == 0 else "nothing"
                replies.append(Reply(text, name, Usage(ledger), timings, message_bytes=8 * bool(sent)))
            result.add(examples[start : start + 2], replies, task, "executor")
    return EvalResult("relay", 4, results)


def md_table(path):
    """The first table of report.md (the channel table) as {channel: {column: cell}}."""
    table = next(block for block in path.read_text().split("\n\n") if block.startswith("|")).splitlines()
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert header == headers(COLUMNS, json.loads((path.parent / "report.json").read_text())["channels"])
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def check_agreement(out):
    report = json.loads((out / "report.json").read_text())
    table = md_table(out / "report.md")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert list(table) == list(report["channels"])
    for name, c in report["channels"].items():
        mine = [p for p in predictions if p["channel"] == name]
        assert [p["index"] for p in mine] == list(range(report["n"]))
        assert c["accuracy"] == sum(p["correct"] for p in mine) / report["n"]
        assert table[name]["accuracy (%)"] == f"{100 * c['accuracy']:.2f}"
        assert c["tokens"]["total"] == sum(p["tokens"] for p in mine) == int(table[name]["processed tokens"])
        assert c["tokens"]["total"] == sum(c["tokens"]["by_agent"].values()) == sum(c["tokens"]["by_stage"].values())
        assert c["tokens_per_query"] == c["tokens"]["total"] / report["n"]
        assert table[name]["time (s)"] == f"{c['seconds']:.2f}"
    return report, table, predictions


def test_report_files_agree_with_each_other(tmp_path):
    report = write_report(fake_result(), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(REPORT_FILES)  # no temp files left
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved, table, predictions = check_agreement(tmp_path / "out")
    assert saved == report
    text = report["channels"]["text"]
    assert text["accuracy"] == 0.5 and text["tokens"] == {
        "total": 960, "by_agent": {"executor": 360, "reader": 600}, "by_stage": {"senders": 600, "receiver": 360}, "cached": 0}
    assert text["seconds"] == 10.0 and text["seconds_by_stage"] == {"senders": 6.0, "receiver": 4.0}
    assert text["message_bytes"] == 8 and report["channels"]["none"]["message_bytes"] == 0
    assert table["weights"] == {"channel": "weights", "accuracy (%)": "50.00", "95% interval (%)": "[0.00, 100.00]",
                                     "processed tokens": "360",
                                     "time (s)": "4.00", "tokens vs text": "0.38×", "tokens vs none": "1.80×",
                                     "time vs text": "0.40×", "time vs none": "2.00×"}
    assert predictions[0] == {"channel": "none", "index": 0, "question": "What is the password of Helsinki?",
                              "gold": "jasmine", "prediction": "jasmine", "reply": "jasmine", "correct": True,
                              "tokens": 50, "delta_applied": None}
    rendered = render_table(report)
    assert all(cell in rendered for cell in ["weights", "50.00", "360", "0.38×", "2.00×"])


def test_ratios_only_against_channels_that_ran(tmp_path):
    write_report(fake_result(CHANNELS[2:]), tmp_path)
    row = md_table(tmp_path / "report.md")["weights"]
    assert [row[c] for c in headers(COLUMNS, {})[5:]] == ["—"] * 4


def test_ratio_and_difference_columns_name_the_reference_by_its_label(tmp_path):
    result = fake_result()
    result.channels["none"].label = "none trained"  # the trained control is keyed none, as in `tflow eval`
    write_report(result, tmp_path, None)
    header = md_table(tmp_path / "report.md")["none trained"]
    assert list(header)[5:] == ["tokens vs text", "tokens vs none trained", "time vs text", "time vs none trained"]
    assert "| channel | vs none trained (points) | vs text (points) |" in (tmp_path / "report.md").read_text()


def test_accuracies_carry_intervals_and_channels_paired_differences(tmp_path):
    result = fake_result()
    weights, text = result.channels["weights"], result.channels["text"]
    weights.predictions = [replace(p, correct=True) for p in weights.predictions]
    text.predictions, text.holders = text.predictions[:3], text.holders[:3]
    text.failures = [Failure(3, "q", 0, "boom")]  # counts as wrong
    report = write_report(result, tmp_path)
    half = list(bootstrap_interval([True, False, True, False]))
    assert report["channels"]["none"]["interval"] == report["channels"]["text"]["interval"] == half
    assert report["channels"]["weights"]["interval"] == [1.0, 1.0]
    assert {a: set(d) for a, d in report["differences"].items()} == {
        "none": {"text", "weights"}, "text": {"none", "weights"}, "weights": {"none", "text"}}
    diff, low, high = paired_difference([True] * 4, [True, False, True, False])
    assert report["differences"]["weights"]["none"] == {"difference": diff, "interval": [low, high]} and diff == 0.5
    assert report["differences"]["text"]["none"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    assert report["bootstrap"] == {"resamples": 2000, "seed": 0, "level": 0.95}
    cell = f"+50.00 [{100 * low:+.2f}, {100 * high:+.2f}]"
    assert f"| weights | {cell} | {cell} |" in (tmp_path / "report.md").read_text()
    rendered = render_table(report)
    assert "paired differences" in rendered and cell in rendered


def test_ablation_rows_carry_intervals_and_differences_against_their_channel_and_none(tmp_path):
    shuffled = fake_result(CHANNELS[2:]).channels["weights"]
    shuffled.predictions = [replace(p, correct=False) for p in shuffled.predictions]
    report = write_report(replace(fake_result(), ablations={"weights": {"shuffled": shuffled}}), tmp_path)
    row = report["ablations"]["weights"]["shuffled"]
    assert row["interval"] == [0.0, 0.0]
    assert set(row["differences"]) == {"weights", "none"}
    assert row["differences"]["weights"]["difference"] == row["differences"]["none"]["difference"] == -0.5
    low, high = row["differences"]["none"]["interval"]
    md = (tmp_path / "report.md").read_text()
    assert "| weights | 50.00 | [0.00, 100.00] | +0.00 [+0.00, +0.00] |" in md
    assert f"| shuffled | 0.00 | [0.00, 0.00] | -50.00 [{100 * low:+.2f}, {100 * high:+.2f}] |" in md


def test_empty_or_all_wrong_predictions_are_warned_about_at_the_top(tmp_path):
    assert write_report(fake_result(), tmp_path / "fine")["warnings"] == []
    result = fake_result()
    for r in result.channels.values():
        r.predictions = [replace(p, prediction="", correct=False) for p in r.predictions]
    report = write_report(result, tmp_path / "empty")
    assert report["warnings"] == [
        "the predictions of every channel are all empty: no reply held an answer the task could read",
        "accuracy is 0 for every channel: check the model, the checkpoint and the task before reading the table"]
    md = (tmp_path / "empty" / "report.md").read_text().split("\n")
    assert md[2].startswith("**Warning:** the predictions of every channel") and md[4].startswith("**Warning:** accuracy")
    result = fake_result()
    result.channels["weights"].predictions = [replace(p, prediction="") for p in result.channels["weights"].predictions]
    assert write_report(result, tmp_path / "one")["warnings"] == [
        "the predictions of weights are all empty: no reply held an answer the task could read"]


def test_provenance_is_in_the_json_and_at_the_top_of_the_md(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", ["seed=3"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "generator.safetensors").write_bytes(b"")  # a folder holding the weights part
    (ckpt / "steps.json").write_text('{"global_step": 39}\n')  # as SavePart writes it
    (ckpt / "recipe.yaml").write_text(recipe.to_yaml())
    p = provenance(recipe, "recipes/tiny.yaml", ckpt, "relay", "test", 64, 4)
    assert p["recipe"]["sha256"] == hashlib.sha256(recipe.to_yaml().encode()).hexdigest()
    assert p["recipe"]["resolved"] == recipe.to_dict() and p["recipe"]["path"] == "recipes/tiny.yaml"
    assert p["checkpoint"] == {"path": str(ckpt), "steps": {"weights": 39}, "seed": 3,
                               "recipe_sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest()}
    assert {k: p[k] for k in ("task", "split", "split_size", "limit", "seed")} == {
        "task": "relay", "split": "test", "split_size": 64, "limit": 4, "seed": 3}
    assert p["tflow"]["version"] == tflow.__version__
    assert datetime.fromisoformat(p["date"]).utcoffset() == timedelta(0)
    assert p["machine"]["torch_threads"] == torch.get_num_threads() and p["machine"]["torch"] == torch.__version__
    report = write_report(fake_result(), tmp_path / "out", provenance=p)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["provenance"] == report["provenance"] == p
    md = (tmp_path / "out" / "report.md").read_text().split("\n")
    assert [line.split(":")[0] for line in md[2:7]] == ["- Recipe", "- Checkpoint", "- Data", "- Code", "- Run"]
    assert md[3] == f"- Checkpoint: `{ckpt}` (weights 39 steps; trained with seed 3)"
    assert md[4] == "- Data: task relay, split test (64 examples, --limit 4), seed 3"


def test_provenance_never_fails_without_git_checkpoints_or_parts(tmp_path, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance_module.git_commit() is None
    (tmp_path / "empty").mkdir()
    assert provenance_module.checkpoint_provenance(tmp_path / "empty") == {
        "path": str(tmp_path / "empty"), "steps": {}, "seed": None, "recipe_sha256": None}
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "generator.safetensors").write_bytes(b"")
    assert provenance_module.checkpoint_provenance(tmp_path / "part")["steps"] == {"weights": None}
    (tmp_path / "part" / "steps.json").write_text('{"global_step": ')  # torn
    assert provenance_module.checkpoint_provenance(tmp_path / "part")["steps"] == {"weights": None}
    p = provenance(load_recipe("recipes/tiny.yaml"), "recipes/tiny.yaml", None, "relay", "test", 64, None)
    assert p["checkpoint"] is None and p["tflow"]["commit"] is None
    write_report(fake_result(), tmp_path / "out", provenance=p)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "- Checkpoint: none" in md and "commit unknown (not a git checkout)" in md and "(64 examples)" in md


def test_provenance_never_unpickles_lightnings_checkpoint(tmp_path):
    """A checkpoint folder handed to `tflow eval` may be anyone's: its last.ckpt (a pickle) is not
    read, even where it names a step and no steps.json does."""
    (tmp_path / "generator.safetensors").write_bytes(b"")
    (tmp_path / "lightning").mkdir()
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "lightning" / "last.ckpt").write_bytes(pickle.dumps({"global_step": 39, "trap": Trap()}))
    assert provenance_module.checkpoint_provenance(tmp_path)["steps"] == {"weights": None}
    assert not marker.exists()


def test_unwritable_out_is_an_output_error(tmp_path):
    (tmp_path / "file.txt").write_text("in the way")
    with pytest.raises(OutputError, match="cannot write to .*file.txt/sub"):
        write_report(fake_result(), tmp_path / "file.txt" / "sub")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A folder with the tiny model and a checkpoint of its fresh, exactly no-op generator."""
    tmp = tmp_path_factory.mktemp("eval")
    args = recipe_args(tmp)
    weights_part.save(tflow.load(load_recipe(args[0], args[1:])).receiver.generator, tmp / "ckpt")
    return tmp


def test_eval_cli_writes_an_agreeing_report(cli):
    tmp = cli
    result = runner.invoke(app, ["eval", *recipe_args(tmp), "--checkpoint", str(tmp / "ckpt"), "--limit", "4",
                                 "--out", str(tmp / "out"), "--batch-size", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(REPORT_FILES)
    assert [f"wrote {tmp / 'out' / f}" for f in REPORT_FILES] == result.stdout.splitlines()[-4:]
    assert "tokens vs text" in result.stdout
    report, _, predictions = check_agreement(tmp / "out")
    assert report["task"] == "relay" and report["n"] == 4 and list(report["channels"]) == ["none", "text", "weights"]
    gold = [ex.answer for ex in relay.split(0, 16, 8, senders=["reader"])[1][:4]]
    assert [p["gold"] for p in predictions if p["channel"] == "none"] == gold  # the held-out test split
    replies = {name: [p["reply"] for p in predictions if p["channel"] == name] for name in ("none", "weights")}
    assert replies["weights"] == replies["none"]  # a fresh generator changes no answer
    by_stage = {name: c["tokens"]["by_stage"] for name, c in report["channels"].items()}
    assert by_stage["weights"]["receiver"] == by_stage["none"]["receiver"] and by_stage["weights"]["senders"] > 0
    p = report["provenance"]
    assert p["checkpoint"] == {"path": str(tmp / "ckpt"), "steps": {"weights": None}, "seed": None, "recipe_sha256": None}
    assert (p["task"], p["split"], p["split_size"], p["limit"]) == ("relay", "test", 8, 4)
    assert p["recipe"]["resolved"]["model"]["path"] == f"{tmp}/model"
    zero = all(c["accuracy"] == 0 for c in report["channels"].values())
    assert ("warning: accuracy is 0 for every channel" in result.stderr) == zero


@pytest.mark.parametrize("extra, message", [
    (["--channels", "none,weights"], "error: the weights channel needs a checkpoint with its generator: pass --checkpoint DIR"),
    (["--channels", "none,smoke"], "error: unknown channel(s) 'smoke'; choose from: none, text, weights"),
    (["--channels", "none", "--task", "nope"], "error: unknown task 'nope'; available: "),
    (["--channels", "none", "--out", "{tmp}/file.txt/sub"], "error: cannot write to {tmp}/file.txt/sub: "),
])
def test_eval_cli_mistakes_exit_2_with_one_line_before_loading(tmp_path, extra, message):
    (tmp_path / "file.txt").write_text("in the way")
    result = runner.invoke(app, ["eval", *recipe_args(tmp_path), *[e.format(tmp=tmp_path) for e in extra]])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # no traceback
    assert result.stderr.startswith(message.format(tmp=tmp_path)) and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "model").exists()  # failed before building or loading any model
