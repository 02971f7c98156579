"""Generator training on Lightning: val loss falls, checkpoints load to the same answers, kills and resumes."""

import csv
import json
import subprocess
import sys

import lightning as L
import pytest
import torch

import tflow
from tflow.channels.weights import part as weights_part
from tflow.config.recipe import load_recipe
from tflow.errors import CheckpointError, OutputError
from tflow.evaluation.evaluate import evaluate
from tflow.io import exclusive
from tflow.training.data import load_splits
from tflow.training.loop import train

RECIPE = "recipes/tiny.yaml"


def recipe(tmp, *extra):
    return load_recipe(RECIPE, [f"model.path={tmp}/model", f"train.out_dir={tmp}/out", "train.val_every=10",
                                "train.max_steps=40", "data.relay.n_train=256", "data.relay.n_test=32", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return recipe(tmp, "train.val_answers=16"), train(recipe(tmp, "train.val_answers=16"), progress=False)


def val_losses(out_dir):
    rows = list(csv.DictReader(open(out_dir / "metrics.csv")))
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]


def test_val_loss_falls_on_held_out_split(trained):
    _, result = trained
    assert result.global_step == 40
    assert json.loads((result.out_dir / "steps.json").read_text()) == {"global_step": 40}
    losses = val_losses(result.out_dir)
    assert losses[0][0] == 0 and len(losses) == 5
    assert losses[-1][1] < losses[0][1] - 0.1, losses
    names = {r for r in csv.DictReader(open(result.out_dir / "metrics.csv")).fieldnames}
    assert {"train_loss", "val_loss"} <= names


def test_val_accuracy_is_the_trained_channels_accuracy_on_the_first_val_queries(trained):
    rec, result = trained
    rows = [r for r in csv.DictReader(open(result.out_dir / "metrics.csv")) if r["val_accuracy"]]
    assert [int(r["step"]) for r in rows] == [step for step, _ in val_losses(result.out_dir)]  # every validation
    splits = load_splits(rec)
    again = evaluate(result.team, splits.task, splits.val[:16], "weights")  # the part as step 40 left it
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(again.channels["weights"].accuracy)


def test_checkpoint_holds_only_generator_and_loads_to_same_answers(trained):
    rec, result = trained
    from safetensors import safe_open

    with safe_open(str(result.out_dir / "generator.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.split(".")[0] in ("aggregation", "generator", "fusion") for k in keys)
    assert sum(1 for _ in result.team.receiver.generator.state_dict()) == len(keys)
    assert "receiver_fingerprint" in meta and meta["tflow.version"] == tflow.__version__
    assert (result.out_dir / "recipe.yaml").is_file()
    loaded = tflow.load(rec, checkpoint=result.out_dir)
    for k, v in result.team.receiver.generator.state_dict().items():
        assert torch.equal(loaded.receiver.generator.state_dict()[k], v), k
    questions = ["What is the secret code of Lisbon?", "What is the password of Oslo?"]
    contexts = [{"reader": "The secret code of Lisbon is 123."}, {"reader": "The password of Oslo is tiger."}]
    trained_replies = result.team.communicate(questions, contexts=contexts)
    loaded_replies = loaded.communicate(questions, contexts=contexts)
    assert [r.text for r in loaded_replies] == [r.text for r in trained_replies]


def test_checkpoint_for_another_receiver_is_refused(trained, tmp_path):
    _, result = trained
    other = recipe(tmp_path, "model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1")
    with pytest.raises(CheckpointError, match="trained for another receiver"):
        tflow.load(other, checkpoint=result.out_dir)


def test_missing_checkpoint_is_an_error_never_an_untrained_generator(trained, tmp_path):
    rec, _ = trained
    with pytest.raises(CheckpointError, match="does not exist"):
        tflow.load(rec, checkpoint=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no trained part"):
        tflow.load(rec, checkpoint=tmp_path / "empty")


def test_kill_while_writing_checkpoint_keeps_previous_one(trained, tmp_path, monkeypatch):
    rec, result = trained
    hypernet = result.team.receiver.generator
    weights_part.save(hypernet, tmp_path)
    before = (tmp_path / "generator.safetensors").read_bytes()
    import safetensors.torch

    def dying(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a torn, half-written file
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        weights_part.save(hypernet, tmp_path)
    assert (tmp_path / "generator.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["generator.safetensors"]
    monkeypatch.undo()
    fresh = tflow.load(rec, checkpoint=tmp_path)
    assert torch.equal(next(iter(fresh.receiver.generator.parameters())), next(iter(hypernet.parameters())))


class Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 15:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_final_step(tmp_path):
    rec = recipe(tmp_path, "train.max_steps=20")
    first = train(rec, progress=False, callbacks=[Interrupt()])
    assert first.interrupted and first.global_step == 15
    resumed = train(rec, resume=True, progress=False)
    assert resumed.global_step == 20 and not resumed.interrupted
    assert json.loads((tmp_path / "out" / "steps.json").read_text()) == {"global_step": 20}
    steps = [s for s, _ in val_losses(tmp_path / "out")]
    assert steps == [0, 9, 19]  # the first run's history survives the resume
    assert not (tmp_path / "out" / "metrics.before-resume.csv").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="--resume"):
        train(recipe(tmp_path), resume=True, progress=False)


def test_a_second_run_into_a_folder_in_use_is_refused_before_loading(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with exclusive(out, "tflow train"):  # as a run in another process holds it
        with pytest.raises(OutputError, match=r"out is in use by another tflow train; wait for it"):
            train(recipe(tmp_path), progress=False)
        assert list(out.iterdir()) == [] and not (tmp_path / "model").exists()
        cmd = [sys.executable, "-m", "tflow.cli", "train", RECIPE, f"model.path={tmp_path}/model",
               f"train.out_dir={out}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "in use by another tflow train" in done.stderr
    with exclusive(out, "tflow train"):  # released when its holder is done: the folder can be taken again
        pass


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "tflow.cli", "train", RECIPE, f"model.path={tmp_path}/model",
           f"train.out_dir={tmp_path}/out", "train.strategy=ddp", "train.devices=2", "train.max_steps=6",
           "train.val_every=3", "data.relay.n_train=64", "data.relay.n_test=16", "train.batch_size=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["generator.safetensors"]
    assert tflow.load(recipe(tmp_path), checkpoint=tmp_path / "out").receiver.generator is not None
