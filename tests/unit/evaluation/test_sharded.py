"""tflow eval sharded over two CPU processes with Lightning ddp, against the same eval in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_args
from typer.testing import CliRunner

import tflow
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.evaluation.evaluate import Failure, evaluate
from tflow.evaluation.report import REPORT_FILES
from tflow.evaluation.sharded import eval_trainer, evaluate_sharded
from tflow.tasks import relay

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[3]
EVAL = ["--channels", "none,text", "--limit", "5", "--batch-size", "2", "--no-progress"]
TIMES = ("seconds", "seconds_by_stage", "wall_seconds")
FAILING = """import os
import sys

import tflow.team
from tflow.cli import app

bad = os.environ["FAIL_QUESTION"]
communicate = tflow.team.Team.communicate


def communicate_or_fail(self, query, *args, **kwargs):
    if any(bad in q for q in ([query] if isinstance(query, str) else query)):
        raise RuntimeError("injected failure\\nsecond line")
    return communicate(self, query, *args, **kwargs)


tflow.team.Team.communicate = communicate_or_fail
sys.exit(app())
"""


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process report (which also builds the tiny model both DDP processes then load)."""
    tmp = tmp_path_factory.mktemp("sharded")
    result = runner.invoke(app, ["eval", *recipe_args(tmp), *EVAL, "--out", str(tmp / "single")])
    assert result.exit_code == 0, result.output
    return tmp


def ddp(tmp, out, *command, env=None):
    """`tflow eval` on two CPU processes (ddp over gloo), as a user starts it."""
    cmd = [sys.executable, *command, "eval", *recipe_args(tmp), *EVAL, "--out", str(out), "--strategy", "ddp",
           "--devices", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read(out):
    report = json.loads((out / "report.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return report, predictions


def untimed(report):
    """A report less what differs between two runs of one eval: times, and the provenance's date and
    machine (the DDP processes run a thread each)."""
    provenance = {k: v for k, v in report["provenance"].items() if k not in ("date", "machine")}
    return {**report, "processes": None, "provenance": provenance,
            "channels": {n: {k: v for k, v in c.items() if k not in TIMES} for n, c in report["channels"].items()}}


@pytest.mark.slow
def test_ddp_eval_equals_one_process_and_writes_one_report(single):
    out = single / "ddp"
    done = ddp(single, out, "-m", "tflow.cli")
    (one, one_predictions), (two, two_predictions) = read(single / "single"), read(out)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two_predictions == one_predictions  # every reply, verdict and count, in example order
    assert untimed(two) == untimed(one)  # accuracy, tokens by agent and stage, bytes, no errors
    for name, c in two["channels"].items():
        assert c["accuracy"] == one["channels"][name]["accuracy"] and c["errors"] == []
        assert c["tokens"]["total"] == one["channels"][name]["tokens"]["total"] > 0
        assert set(c["seconds_by_stage"]) == set(one["channels"][name]["seconds_by_stage"])
        assert c["wall_seconds"] > 0
    assert "Sharded over 2 processes" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)  # no shard files left behind
    assert [line for line in done.stdout.splitlines() if line.startswith("wrote ")] == [
        f"wrote {out / f}" for f in REPORT_FILES]  # written once, by rank 0
    assert done.stdout.count("relay (n = 5)") == 1
    assert [line for line in (done.stdout + done.stderr).splitlines()
            if "Initializing distributed" in line or "distributed_backend" in line] == []  # no Lightning banners


@pytest.mark.slow
def test_a_query_that_fails_on_one_rank_is_reported_not_lost(single, tmp_path):
    # The sampler gives rank 1 examples 1 and 3 in one batch, then 0 again (its padding repeat):
    # 3 fails, so that batch is retried query by query and 1 still answers; 0 is reported once.
    questions = [ex.question for ex in relay.split(0, 16, 8, senders=["reader"])[1][:5]]
    script = tmp_path / "failing_eval.py"
    script.write_text(FAILING)
    done = ddp(single, tmp_path / "out", str(script), env={"FAIL_QUESTION": questions[3]})
    (_, one_predictions), (two, two_predictions) = read(single / "single"), read(tmp_path / "out")
    for name, c in two["channels"].items():
        assert c["errors"] == [{"index": 3, "question": questions[3], "rank": 1,
                                "message": "RuntimeError: injected failure"}]
        mine = [p for p in two_predictions if p["channel"] == name]
        assert [p["index"] for p in mine] == [0, 1, 2, 4]
        assert mine == [p for p in one_predictions if p["channel"] == name and p["index"] != 3]
        assert c["accuracy"] == sum(p["correct"] for p in mine) / 5  # the failed query counts as wrong
        assert f"warning: {name} query 3 failed on rank 1: RuntimeError: injected failure" in done.stderr
    assert "## Failed queries" in (tmp_path / "out" / "report.md").read_text()


def test_more_processes_from_python_c_is_one_clear_error(tmp_path, monkeypatch):
    import __main__

    monkeypatch.setattr(sys, "argv", ["-c", "eval"])
    monkeypatch.setattr(__main__, "__spec__", None)
    result = runner.invoke(app, ["eval", *recipe_args(tmp_path), "--channels", "none", "--devices", "2",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == ("error: more than one device starts each process by rerunning this command, which '-c' "
                             "cannot be; run `tflow eval ...` or `python -m tflow.cli eval ...`\n")
    assert not (tmp_path / "model").exists()  # failed before building or loading any model


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    args = recipe_args(tmp_path_factory.mktemp("team"))
    return tflow.load(load_recipe(args[0], args[1:]))


def fields(result):
    return {name: (r.predictions, r.tokens_by_agent, r.tokens_by_stage, r.kv_cache_bytes, r.message_bytes, r.accuracy,
                   r.failures, set(r.seconds_by_stage)) for name, r in result.channels.items()}


def test_lightning_test_loop_in_one_process_equals_evaluate(team):
    task, examples = relay.Relay(), relay.generate(5, seed=0, senders=["reader"])
    plain = evaluate(team, task, examples, "none,text", batch_size=2)
    sharded = evaluate_sharded(eval_trainer("auto", 1, accelerator="cpu", progress=False), team, task, examples,
                               "none,text", batch_size=2)
    assert sharded.processes == 1 and fields(sharded) == fields(plain)


def test_a_failing_query_is_kept_and_its_batch_mate_still_answers(team, monkeypatch):
    task, examples = relay.Relay(), relay.generate(5, seed=0, senders=["reader"])
    communicate = team.communicate

    def failing(queries, **kwargs):
        if any(examples[3].question in q for q in queries):
            raise RuntimeError("injected failure\nsecond line")
        return communicate(queries, **kwargs)

    monkeypatch.setattr(team, "communicate", failing)
    result = evaluate_sharded(eval_trainer("auto", 1, accelerator="cpu", progress=False), team, task, examples,
                              "none", batch_size=2)
    none = result.channels["none"]
    assert none.failures == [Failure(3, examples[3].question, 0, "RuntimeError: injected failure")]
    assert [p.index for p in none.predictions] == [0, 1, 2, 4]
    assert none.accuracy == sum(p.correct for p in none.predictions) / 5


def test_merge_keeps_each_example_once_in_order_and_every_call_cost():
    from types import SimpleNamespace

    from tflow.evaluation.sharded import Shard, merge
    from tflow.reply import AgentUsage, Reply, Usage

    examples = relay.generate(3, seed=0, senders=["reader"])

    def reply(i):
        return Reply(examples[i].answer, "none", Usage({"executor": AgentUsage(10 + i, 2)}), {"receiver": 1.0})

    def failure(i, rank):
        return Failure(i, examples[i].question, rank, "RuntimeError: x")

    # 3 examples on 2 processes: rank 0 answers 0 and fails on 2; rank 1 answers 1 and fails on
    # its padding repeat of 0, which is dropped since rank 0 answered it
    shards = [Shard(0, {"none": [([0], [reply(0)])]}, {"none": [failure(2, 0)]}, {"none": 2.0}),
              Shard(1, {"none": [([1], [reply(1)])]}, {"none": [failure(0, 1)]}, {"none": 3.0})]
    team = SimpleNamespace(label=lambda channel: channel, receiver=SimpleNamespace(name="executor"))
    (result,) = merge(shards, team, relay.Relay(), examples, ["none"]).values()
    assert [p.index for p in result.predictions] == [0, 1] and all(p.correct for p in result.predictions)
    assert result.failures == [failure(2, 0)] and result.accuracy == 2 / 3
    assert result.tokens == 12 + 13 and result.seconds_by_stage == {"receiver": 2.0}
    assert result.wall_seconds == 3.0
