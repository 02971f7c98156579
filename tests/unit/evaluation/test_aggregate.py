"""Aggregating evals of several training seeds: means, ranges, joint intervals, time ratios within
each eval, and the refusals of evals that differ; reports written by the real `write_report`."""

import json
from dataclasses import replace

import pytest
from test_report import CHANNELS, fake_result
from typer.testing import CliRunner

from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import AggregateError
from tflow.evaluation.aggregate import AGGREGATE_FILES, aggregate, write_aggregate
from tflow.evaluation.provenance import provenance
from tflow.evaluation.report import write_report

runner = CliRunner()
RECIPE = "recipes/tiny.yaml"


def eval_dir(folder, seed=0, right=None, slower=1.0, overrides=(), split="test", channels=CHANNELS, task="relay"):
    """A report of the 4-query fake eval: `right[channel]` queries answered right (the first ones),
    every stage `slower` times as slow, the tiny recipe with `seed` and `overrides`."""
    result = replace(fake_result(channels), task=task)
    for name, r in result.channels.items():
        k = (right or {}).get(name, 2)
        r.predictions = [replace(p, correct=p.index < k) for p in r.predictions]
        r.seconds_by_stage = {stage: s * slower for stage, s in r.seconds_by_stage.items()}
    recipe = load_recipe(RECIPE, [f"seed={seed}", *overrides])
    write_report(result, folder, provenance(recipe, RECIPE, None, task, split, 64, 4))
    return folder


def test_three_seeds_give_means_ranges_joint_intervals_and_in_eval_time_ratios(tmp_path):
    rights = [{"text": 1, "weights": 3}, {"text": 2, "weights": 4}, {"text": 3, "weights": 2}]
    runs = [eval_dir(tmp_path / f"seed{i}", seed=i, right=right, slower=2.0 ** i,
                     overrides=[f"train.out_dir=runs/seed{i}"]) for i, right in enumerate(rights)]
    summary = aggregate(runs)
    write_aggregate(summary, tmp_path / "agg")
    assert sorted(p.name for p in (tmp_path / "agg").iterdir()) == sorted(AGGREGATE_FILES)
    assert json.loads((tmp_path / "agg" / "aggregate.json").read_text()) == summary
    assert (summary["task"], summary["split"], summary["n"]) == ("relay", "test", 4)
    assert [r["seed"] for r in summary["runs"]] == [0, 1, 2] and summary["runs"][0]["dir"] == str(runs[0])
    text, weights = summary["channels"]["text"], summary["channels"]["weights"]
    assert text["accuracy"]["runs"] == [0.25, 0.5, 0.75]
    assert {k: text["accuracy"][k] for k in ("mean", "min", "max")} == {"mean": 0.5, "min": 0.25, "max": 0.75}
    low, high = weights["accuracy"]["interval"]
    assert low < weights["accuracy"]["mean"] == 0.75 < high <= 1.0
    assert summary["channels"]["none"]["accuracy"]["interval"][0] < 0.5  # a constant 2/4 still has query noise
    assert text["tokens_per_query"] == {"mean": 240.0, "min": 240.0, "max": 240.0}
    assert text["seconds"]["mean"] == pytest.approx(10.0 * (1 + 2 + 4) / 3)  # absolute time differs by run
    ratio = weights["time_ratio"]["text"]  # but within each run weights takes 0.4 of text's time
    assert ratio["runs"] == pytest.approx([0.4] * 3) and ratio["min"] == pytest.approx(ratio["max"])
    assert set(weights["time_ratio"]) == {"none", "text"} and set(text["time_ratio"]) == {"none"}
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    assert "| time vs none (range) | time vs text (range) |" in md
    assert "| weights | 75.00 | 50.00–100.00 |" in md and "0.40×–0.40×" in md and "seed 2" in md
    assert (tmp_path / "agg" / "aggregate.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("other, message", [
    (dict(task="gsm8k"), "task differs (relay vs gsm8k)"),
    (dict(split="val"), "split differs (test vs val)"),
    (dict(channels=CHANNELS[:2]), "channel set differs (none, text, weights vs none, text)"),
    (dict(overrides=["generate.max_new_tokens=16"]), "recipe key generate.max_new_tokens differs (8 vs 16)"),
    (dict(overrides=["data.relay.seed=1"]), "recipe key data.relay.seed differs (0 vs 1)"),
])
def test_evals_of_different_setups_are_refused_naming_the_difference(tmp_path, other, message):
    runs = [eval_dir(tmp_path / "a"), eval_dir(tmp_path / "b", seed=1, **other)]
    with pytest.raises(AggregateError, match="^" + f"cannot aggregate {runs[0]} and {runs[1]}: {message}"
                       .replace("(", r"\(").replace(")", r"\)")):
        aggregate(runs)


def without_key(run, section: str, key: str):
    """The eval in `run` as a tflow from before recipe key `section.key` existed would have written it."""
    path = run / "report.json"
    report = json.loads(path.read_text())
    del report["provenance"]["recipe"]["resolved"][section][key]
    path.write_text(json.dumps(report))
    return run


def test_a_key_an_older_report_lacks_counts_at_its_default(tmp_path):
    old = without_key(eval_dir(tmp_path / "old"), "train", "val_answers")
    assert [r["seed"] for r in aggregate([old, eval_dir(tmp_path / "new", seed=1)])["runs"]] == [0, 1]
    other = eval_dir(tmp_path / "other", seed=1, overrides=["train.val_answers=8"])
    with pytest.raises(AggregateError, match=r"recipe key train.val_answers differs \(0 vs 8\)$"):
        aggregate([old, other])


def test_the_interval_resamples_the_shared_queries_once_and_other_queries_are_refused(tmp_path):
    runs = [eval_dir(tmp_path / f"seed{i}", seed=i) for i in range(2)]  # the same verdicts twice
    one = aggregate(runs[:1])["channels"]["text"]["accuracy"]["interval"]
    assert aggregate(runs)["channels"]["text"]["accuracy"]["interval"] == one  # no narrower than one eval
    path = runs[1] / "predictions.jsonl"
    path.write_text(path.read_text().replace('"question": "', '"question": "Not ', 1))
    with pytest.raises(AggregateError, match=f"^cannot aggregate {runs[0]} and {runs[1]}: the queries differ"):
        aggregate(runs)
    path.unlink()
    with pytest.raises(AggregateError, match="predictions.jsonl does not exist"):
        aggregate(runs)


def test_missing_or_unprovenanced_reports_are_refused(tmp_path):
    write_report(fake_result(), tmp_path / "old")  # no provenance
    with pytest.raises(AggregateError, match="old/report.json has no provenance"):
        aggregate([tmp_path / "old"])
    with pytest.raises(AggregateError, match="nothing/report.json does not exist"):
        aggregate([tmp_path / "nothing"])


def test_aggregate_cli_prints_the_table_and_refuses_in_one_line(tmp_path):
    runs = [str(eval_dir(tmp_path / f"s{i}", seed=i)) for i in range(2)]
    done = runner.invoke(app, ["aggregate", *runs, "--out", str(tmp_path / "agg")])
    assert done.exit_code == 0, done.output
    assert "95% interval" in done.stdout and "pooled" not in done.stdout
    assert done.stdout.splitlines()[-3:] == [f"wrote {tmp_path / 'agg' / f}" for f in AGGREGATE_FILES]
    eval_dir(tmp_path / "other", channels=CHANNELS[:1])
    done = runner.invoke(app, ["aggregate", runs[0], str(tmp_path / "other"), "--out", str(tmp_path / "agg2")])
    assert done.exit_code == 2 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"error: cannot aggregate {runs[0]} and {tmp_path / 'other'}: channel set differs")
    assert not (tmp_path / "agg2").exists()
