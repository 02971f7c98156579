"""No tensor a channel makes lands on the default device: with `meta` as the default device, every
channel answers exactly as it does without, and every trained channel's training step computes its
loss and gradients. A tensor made without its model's device would land on `meta` and fail the
first operation that meets the model's tensors (a CUDA run meets the same slip as a mismatch)."""

import pytest
import torch
from conftest import DEVICES, perturb

import tflow
from tflow.channels import registry
from tflow.config.recipe import load_recipe
from tflow.training.data import load_splits

CHANNELS = ["none", "text", "context", "weights", "kv", "latent"]
QUERIES = ["What is the secret code of Lisbon?", "Hi"]
CONTEXTS = [{"reader": "The secret code of Lisbon is 482."}, {"reader": "Nothing here."}]


def recipe(tmp, device, channel="weights"):
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tmp}/model", f"model.device={device}", "train.accelerator=auto", f"train.channel={channel}",
        "generate.max_new_tokens=4", "generate.message_tokens=3", "kv.latent_steps=2", "latent.latent_steps=2",
        "data.relay.n_train=8", "data.relay.n_val=4", "data.relay.n_test=4"])


@pytest.mark.parametrize("device", DEVICES)
def test_every_channel_answers_alike_with_meta_as_the_default_device(tmp_path, device):
    team = tflow.load(recipe(tmp_path, device))
    perturb(team.receiver.model, seed=1)  # answers that depend on what the receiver reads
    perturb(team.receiver.generator, seed=2)
    for channel in CHANNELS:
        plain = [r.text for r in team.communicate(QUERIES, channel=channel, contexts=CONTEXTS)]
        with torch.device("meta"):
            replies = team.communicate(QUERIES, channel=channel, contexts=CONTEXTS)
        assert [r.text for r in replies] == plain, channel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channel", registry.trained())
def test_a_training_step_makes_nothing_on_the_default_device(tmp_path, device, channel):
    loaded = recipe(tmp_path, device, channel)
    splits = load_splits(loaded)
    module = registry.get(channel).part.module()(tflow.load(loaded), splits)
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    with torch.device("meta"):
        loss = module.training_step(list(splits.train[:3]), 0)
        loss.backward()
        module.on_after_backward()
    assert loss.device.type == torch.device(device).type and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
