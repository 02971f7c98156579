"""Reports: report.json, report.md, report.png and predictions.jsonl agree; the eval CLI and its mistakes."""

import json

import pytest
from conftest import recipe_args
from typer.testing import CliRunner

import tflow
from tflow.channels.weights import part as weights_part
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import OutputError
from tflow.evaluation.evaluate import ChannelResult, EvalResult
from tflow.evaluation.report import COLUMNS, REPORT_FILES, render_table, write_report
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
    """The first table of report.md as {channel: {column: cell}}."""
    table = path.read_text().split("\n\n")[1].splitlines()
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert header == list(COLUMNS)
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
    assert table["weights"] == {"channel": "weights", "accuracy (%)": "50.00", "processed tokens": "360",
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
    assert [row[c] for c in COLUMNS[4:]] == ["—"] * 4


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
