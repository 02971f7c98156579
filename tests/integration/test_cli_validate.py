"""tflow validate and the CLI's top level: good and bad recipes, overrides, --show, --version, --help."""

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tflow import __version__
from tflow.cli import app

runner = CliRunner()

GOOD = {
    "model": {"path": "Qwen/Qwen3-4B"},
    "senders": [{"name": "strategist", "role": "Plan."}, {"name": "extractor", "role": "Facts."}],
    "generator": {"rank": 8},
}
BAD = {
    "model": {"path": "Qwen/Qwen3-4B", "dtype": "fp32"},
    "senders": [{"role": "Plan."}],
    "train": {"lr": -1, "max_stepz": 3},
}
BAD_PROBLEMS = [
    "model.dtype: must be one of float32, bfloat16, float16, got 'fp32'",
    "senders.0.name: field required",
    "train.lr: must be > 0, got -1",
    "train.max_stepz: unknown key (did you mean max_steps?)",
]


@pytest.fixture
def recipes(tmp_path):
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(BAD))
    return tmp_path


def test_good_recipe_is_ok(recipes):
    path = recipes / "good.yaml"
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {path} (2 senders, generator param_tokens rank 8)\n"


def test_overrides_and_show(recipes):
    path = recipes / "good.yaml"
    result = runner.invoke(app, ["validate", str(path), "generator.kind=mlp", "generator.rank=2", "--show"])
    assert result.exit_code == 0, result.output
    shown, ok = result.stdout.rsplit("ok: ", 1)
    assert yaml.safe_load(shown)["generator"]["kind"] == "mlp"
    assert ok == f"{path} (2 senders, generator mlp rank 2)\n"


def test_bad_recipe_lists_every_problem_and_exits_2(recipes):
    path = recipes / "bad.yaml"
    result = runner.invoke(app, ["validate", str(path), "train.max_steps"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path}: 5 problems",
        "  train.max_steps: override needs key=value, got 'train.max_steps'",
        *(f"  {problem}" for problem in BAD_PROBLEMS),
    ]


def test_single_problem_is_one_line(recipes):
    result = runner.invoke(app, ["validate", str(recipes / "good.yaml"), "train.lr=0"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {recipes / 'good.yaml'}: train.lr: must be > 0, got 0\n"


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.stderr == f"error: recipe file not found: {tmp_path / 'nope.yaml'}\n"


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout == f"tflow {__version__}\n"
    result = runner.invoke(app, [])
    assert "validate" in result.output


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tflow.cli", *args], capture_output=True, text=True, env=env)


def test_real_process_exit_codes_and_no_traceback(recipes):
    bad = run_cli("validate", str(recipes / "bad.yaml"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [f"error: {recipes / 'bad.yaml'}: 4 problems", *(f"  {p}" for p in BAD_PROBLEMS)]
    good = run_cli("validate", str(recipes / "good.yaml"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ok: ")
