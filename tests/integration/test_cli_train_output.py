"""What `tflow train` prints: steps instead of Lightning's banners, and a note before it overwrites a part."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tflow.backbones import tiny
from tflow.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
BANNERS = ["GPU available", "TPU available", "litlogger", "limit_val_batches", "LeafSpec", "Epoch"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("train") / "model", hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1)


def args(model, out, *extra) -> list[str]:
    return ["train", "recipes/tiny.yaml", f"model.path={model}", f"train.out_dir={out}", "train.max_steps=2",
            "train.val_every=1", "train.batch_size=4", "train.log_every=1", "data.relay.n_train=16",
            "data.relay.n_test=4", "generator.d_model=16", *extra]


def test_a_run_shows_its_steps_not_lightnings_banners_and_trains_as_without_a_bar(model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "tflow.cli", *args(model, tmp_path / "bar")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 2/2" in done.stdout and "train_loss" in done.stdout and "val_loss" in done.stdout
    shown = done.stdout + done.stderr
    assert [banner for banner in BANNERS if banner in shown] == []
    quiet = runner.invoke(app, args(model, tmp_path / "plain", "--no-progress"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == (f"training the mlp generator for 2 steps -> {tmp_path / 'plain'}\n"
                            f"done: 2 steps; mlp generator in {tmp_path / 'plain' / 'generator.safetensors'}\n")
    runs = [tmp_path / "bar", tmp_path / "plain"]
    bar, plain = (list(csv.DictReader(open(run / "metrics.csv"))) for run in runs)
    assert bar == plain and all(any(row[k] for row in bar) for k in ("train_loss", "val_loss"))
    bar, plain = (load_file(run / "generator.safetensors") for run in runs)
    assert bar.keys() == plain.keys() and all(torch.equal(bar[k], plain[k]) for k in bar)


def test_training_into_a_folder_that_holds_the_part_says_it_overwrites_it(model, tmp_path):
    out = tmp_path / "out"
    note = f"note: {out / 'generator.safetensors'} exists; this run overwrites it (--resume continues it instead)"
    first = runner.invoke(app, args(model, out, "--no-progress"))
    assert first.exit_code == 0 and note not in first.stderr, first.output
    again = runner.invoke(app, args(model, out, "--no-progress"))
    assert again.exit_code == 0 and note in again.stderr.splitlines(), again.output
    resumed = runner.invoke(app, args(model, out, "--no-progress", "--resume", "--set", "train.max_steps=3"))
    assert resumed.exit_code == 0 and note not in resumed.stderr, resumed.output
    assert resumed.stdout.endswith("done: 3 steps; mlp generator in " f"{out / 'generator.safetensors'}\n")
