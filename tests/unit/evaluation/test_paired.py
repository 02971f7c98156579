"""tflow paired: channels of different evals paired on the same queries, and the refusals of rows
that do not pair; reports written by the real `write_report` (the fake 4-query eval of test_report)."""

import json

import pytest
from test_aggregate import eval_dir
from typer.testing import CliRunner

from tflow.cli import app
from tflow.errors import AggregateError
from tflow.evaluation.paired import paired, read_row, table
from tflow.evaluation.stats import paired_difference


def test_rows_of_two_evals_pair_as_the_same_channels_of_one_eval(tmp_path):
    a = eval_dir(tmp_path / "a", right={"weights": 4, "text": 1})
    b = eval_dir(tmp_path / "b", seed=1, right={"text": 3})
    row = read_row(f"{a}:weights")
    assert (row.task, row.split, row.correct) == ("relay", "test", [True] * 4)
    [result] = paired(f"{a}:weights", [f"{b}:text"])
    expected = paired_difference([True] * 4, [True, True, True, False])
    assert (result["difference"], tuple(result["interval"])) == (expected[0], expected[1:])
    assert result["difference"] == 0.25 and result["n"] == 4
    within = paired(f"{a}:weights", [f"{a}:text"])[0]  # the same pair inside one eval
    assert within["difference"] == paired_difference([True] * 4, [True, False, False, False])[0] == 0.75
    assert f"| {a}:weights − {b}:text | +25.0 |" in table([result])


@pytest.mark.parametrize("make, spec, message", [
    (lambda t: eval_dir(t / "x", split="val"), "{x}:text", r"split differs \(test vs val\)"),
    (lambda t: eval_dir(t / "x", task="gsm8k"), "{x}:text", r"task differs \(relay vs gsm8k\)"),
    (lambda t: eval_dir(t / "x"), "{x}:kv", "ran no channel 'kv'; it ran none, text, weights"),
    (lambda t: eval_dir(t / "x"), "{x}", "give RUN_DIR:CHANNEL"),
    (lambda t: t / "x", "{x}:text", "report.json does not exist"),
])
def test_rows_that_do_not_pair_are_refused_naming_why(tmp_path, make, spec, message):
    a = eval_dir(tmp_path / "a")
    x = make(tmp_path)
    with pytest.raises(AggregateError, match=message):
        paired(f"{a}:weights", [spec.format(x=x)])


def test_other_queries_are_refused_naming_the_first_that_differs(tmp_path):
    a, b = eval_dir(tmp_path / "a"), eval_dir(tmp_path / "b")
    rows = [json.loads(line) for line in (b / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        if r["index"] == 2:
            r["question"] = "What is the password of Nowhere?"
    (b / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AggregateError, match="query 2 differs"):
        paired(f"{a}:weights", [f"{b}:weights"])


def test_cli_prints_the_table_or_one_line_and_exit_2(tmp_path):
    a, b = eval_dir(tmp_path / "a", right={"weights": 4}), eval_dir(tmp_path / "b")
    done = CliRunner().invoke(app, ["paired", f"{a}:weights", f"{b}:weights", f"{b}:none"])
    assert done.exit_code == 0, done.output
    assert done.stdout.count(f"| {a}:weights − {b}:") == 2 and "+50.0" in done.stdout
    done = CliRunner().invoke(app, ["paired", f"{a}:weights"])
    assert done.exit_code == 2 and done.stderr == "error: give at least two rows, RUN_DIR:CHANNEL each: the first minus every other\n"
