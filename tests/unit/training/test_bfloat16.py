"""Every trained channel trains a few steps on a bfloat16 backbone and answers after it (CPU)."""

import math

import pytest
import torch

import tflow
from tflow.config.recipe import load_recipe
from tflow.training.loop import train


def args(tmp, channel):
    return [f"model.path={tmp}/model", "model.dtype=bfloat16", f"train.out_dir={tmp}/out", f"train.channel={channel}",
            "train.max_steps=2", "train.val_every=2", "train.batch_size=4", "data.relay.n_train=8",
            "data.relay.n_val=4", "data.relay.n_test=4", "kv.latent_steps=2", "latent.latent_steps=2",
            "kv.targets=[q_proj,v_proj]", "generate.max_new_tokens=3", "generate.message_tokens=3"]


@pytest.mark.parametrize("channel", ["weights", "kv", "latent", "none", "context"])
def test_a_channel_trains_and_answers_on_a_bfloat16_backbone(tmp_path, channel):
    result = train(load_recipe("recipes/tiny.yaml", args(tmp_path, channel)), progress=False)
    assert result.global_step == 2
    team = tflow.load(load_recipe("recipes/tiny.yaml", args(tmp_path, channel)), checkpoint=tmp_path / "out")
    assert next(team.receiver.model.parameters()).dtype == torch.bfloat16 and team.trained == {channel}
    reply = team.communicate("What is the secret code of Lisbon?", channel=channel,
                             contexts=[{"reader": "The secret code of Lisbon is 482."}])
    assert isinstance(reply.text, str) and math.isfinite(reply.usage.total_tokens)
