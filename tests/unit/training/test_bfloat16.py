"""Every channel end to end on a bfloat16 backbone, on each device present (CUDA marked gpu): trains a
few steps, answers through the library, `tflow ask` and `tflow eval`; the patched forward agrees
with merged weights within bfloat16's precision; `train.precision: bf16-mixed` trains."""

import csv
import json
import math

import pytest
import torch
from conftest import DEVICES, merged_copy, random_delta
from helpers import batch, logits
from typer.testing import CliRunner

import tflow
from tflow.backbones import tiny
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.lora.patching import patched
from tflow.training.loop import run_dir, train

QUERY = "What is the secret code of Lisbon?"
CONTEXT = "reader=The secret code of Lisbon is 482."


def args(tmp, channel, device, dtype="bfloat16"):
    return [f"model.path={tmp}/model", f"model.dtype={dtype}", f"model.device={device}", "train.accelerator=auto",
            f"train.out_dir={tmp}/out", f"train.channel={channel}", "train.max_steps=2", "train.val_every=2",
            "train.batch_size=4", "data.relay.n_train=8", "data.relay.n_val=4", "data.relay.n_test=4",
            "kv.latent_steps=2", "latent.latent_steps=2", "kv.targets=[q_proj,v_proj]", "generate.max_new_tokens=3",
            "generate.message_tokens=3"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channel", ["weights", "kv", "latent", "none", "text", "context"])
def test_a_channel_trains_asks_and_evals_on_a_bfloat16_backbone(tmp_path, channel, device):
    overrides = args(tmp_path, channel, device)
    result = train(load_recipe("recipes/tiny.yaml", overrides), progress=False)
    assert result.global_step == 2
    team = tflow.load(load_recipe("recipes/tiny.yaml", overrides), checkpoint=tmp_path / "out")
    weight = next(team.receiver.model.parameters())
    assert weight.dtype == torch.bfloat16 and weight.device.type == device and team.trained == {channel}
    reply = team.communicate(QUERY, channel=channel, contexts=[{"reader": CONTEXT.removeprefix("reader=")}])
    assert isinstance(reply.text, str) and math.isfinite(reply.usage.total_tokens)
    runner = CliRunner()
    asked = runner.invoke(app, ["ask", "recipes/tiny.yaml", QUERY, "--channel", channel, "--checkpoint",
                                str(tmp_path / "out"), "--context", CONTEXT, *overrides])
    assert asked.exit_code == 0, asked.output
    evaluated = runner.invoke(app, ["eval", "recipes/tiny.yaml", "--checkpoint", str(tmp_path / "out"), "--channels",
                                    channel, "--limit", "2", "--out", str(tmp_path / "eval"), "--no-progress",
                                    *overrides])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 2 and not report["channels"][channel]["errors"]


@pytest.mark.parametrize("device", DEVICES)
def test_the_patched_forward_matches_merged_weights_in_bfloat16(tok, device):
    model = tiny.model(tok, hidden_size=64, num_layers=2, seed=0, dtype=torch.bfloat16).to(device)
    delta = random_delta(model, batch=4, seed=1)  # float32 on the CPU: the patch lays it out on the model
    ids, mask = (t.to(device) for t in batch(tok))
    with patched(model, delta):
        got = logits(model, ids, mask)
    plain = logits(model, ids, mask)
    for row in range(4):
        merged = logits(merged_copy(model, delta, row), ids[row:row + 1], mask[row:row + 1])[0]
        real = mask[row].bool()
        error = (got[row][real] - merged[real]).abs().max().item()
        moved = (plain[row][real] - merged[real]).abs().max().item()
        assert got.dtype == torch.bfloat16 and error <= 0.05 * merged[real].abs().max().item(), (row, error)
        assert error < moved / 10, (row, error, moved)  # the delta moves the logits far more than bf16 rounding


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_mixed_precision_trains_the_generator(tmp_path, device):
    overrides = [*args(tmp_path, "weights", device, dtype="float32"), "train.precision=bf16-mixed"]
    fresh = {k: v.clone() for k, v in tflow.load(load_recipe("recipes/tiny.yaml", overrides))
             .receiver.generator.state_dict().items()}
    result = train(load_recipe("recipes/tiny.yaml", overrides), progress=False)
    assert result.global_step == 2
    trained = result.team.receiver.generator.state_dict()
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[k].cpu(), fresh[k].cpu()) for k in fresh)
    rows = list(csv.DictReader((run_dir(tmp_path / "out", "weights") / "metrics.csv").open()))
    losses = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")}
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses.values())  # before and after
