"""Training with `train.objective: distill | ce+distill` from a trained context control: the
objective falls on the held-out split for the weights and kv channels."""

import csv

import pytest
import torch

import tflow
from tflow.channels import registry
from tflow.config.recipe import load_recipe
from tflow.training.loop import train


def recipe(tmp, *extra):
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tmp}/model", f"train.out_dir={tmp}/out", f"train.teacher_cache={tmp}/cache",
        "data.relay.n_train=64", "data.relay.n_val=16", "train.max_steps=8", "train.val_every=4",
        "train.log_every=2", "kv.targets=[q_proj,v_proj]", "kv.latent_steps=0", *extra])


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A context control whose LoRA moves the receiver far from where it starts: (tmp, its folder)."""
    tmp = tmp_path_factory.mktemp("distill")
    team = tflow.load(recipe(tmp))
    lora = team.receiver.parts["context"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in lora.b:
            b.copy_(torch.randn(b.shape, generator=g))
    registry.get("context").part.save(lora, tmp / "controls", team)
    return tmp, tmp / "controls"


def metrics(path):
    rows = list(csv.DictReader(open(path)))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in ("val_loss", "val_ce", "val_distill", "train_ce")}


@pytest.mark.parametrize("objective", ["distill", "ce+distill"])
@pytest.mark.parametrize("channel", ["weights", "kv"])
def test_distillation_falls_for_every_channel(teacher_checkpoint, channel, objective):
    tmp, controls = teacher_checkpoint
    out = tmp / f"{channel}-{objective}"
    result = train(recipe(tmp, f"train.channel={channel}", f"train.objective={objective}",
                          f"train.teacher_checkpoint={controls}", f"train.out_dir={out}"), progress=False)
    logs = metrics(out / ("metrics.csv" if channel == "weights" else "kv-run/metrics.csv"))
    assert result.global_step == 8 and len(logs["val_distill"]) == 3
    assert logs["val_loss"][-1] < logs["val_loss"][0] - 0.01 * abs(logs["val_loss"][0]), logs
    if objective == "distill":
        assert logs["val_distill"][-1] < 0.8 * logs["val_distill"][0], logs
    want = [c + d for c, d in zip(logs["val_ce"], logs["val_distill"], strict=True)] if objective == "ce+distill" \
        else logs["val_distill"]
    assert logs["val_loss"] == pytest.approx(want, rel=1e-5)
    assert logs["train_ce"], "the answer's cross-entropy is logged beside the distillation"
