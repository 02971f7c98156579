"""Training the kv LoRA and the latent links on Lightning, their checkpoints, and loading them back."""

import copy
import csv
import subprocess
import sys

import pytest
import torch

import tflow
from tflow.channels import receiver_part as kv_part
from tflow.config.recipe import load_recipe
from tflow.errors import CheckpointError
from tflow.training.loop import train

RECIPE = "recipes/tiny.yaml"


def recipe(tmp, *extra):
    return load_recipe(RECIPE, [f"model.path={tmp}/model", f"train.out_dir={tmp}/out", "train.val_every=5",
                                "train.max_steps=15", "data.relay.n_train=256", "data.relay.n_test=32",
                                "kv.latent_steps=3", "kv.targets=[q_proj,v_proj]", "latent.latent_steps=3", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kv then latent trained into one folder: (tmp, {channel: TrainResult})."""
    tmp = tmp_path_factory.mktemp("channels")
    return tmp, {c: train(recipe(tmp, f"train.channel={c}", "train.val_answers=4"), progress=False)
                 for c in ("kv", "latent")}


def val_losses(path):
    return [float(r["val_loss"]) for r in csv.DictReader(open(path)) if r["val_loss"]]


def test_both_channels_learn_and_keep_their_own_logs_in_one_folder(trained):
    tmp, results = trained
    out = tmp / "out"
    assert results["kv"].part == out / "kv" / "adapter_model.safetensors"
    assert results["latent"].part == out / "latent.safetensors"
    for channel in ("kv", "latent"):
        assert results[channel].global_step == 15
        losses = val_losses(out / f"{channel}-run" / "metrics.csv")
        assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, (channel, losses)
        assert (out / f"{channel}-run" / "lightning" / "last.ckpt").is_file()
        accuracy = [r["val_accuracy"] for r in csv.DictReader(open(out / f"{channel}-run" / "metrics.csv"))
                    if r["val_loss"]]
        assert len(accuracy) == 4 and all(a != "" and 0 <= float(a) <= 1 for a in accuracy)  # trains on after answering
    assert not (out / "generator.safetensors").exists()


def test_the_folder_loads_both_parts_exactly(trained):
    tmp, results = trained
    team = tflow.load(recipe(tmp), checkpoint=tmp / "out")
    assert team.trained == {"kv", "latent"} and team.label("kv") == "kv"
    kv, links = results["kv"].team.receiver.kv_lora, results["latent"].team.receiver.links
    assert not kv.is_zero()
    for mine, theirs in ((team.receiver.kv_lora, kv), (team.receiver.links, links)):
        for (k, v), w in zip(theirs.state_dict().items(), mine.state_dict().values(), strict=True):
            assert torch.equal(v, w), k
    assert tflow.load(recipe(tmp)).label("kv") == "kv (LatentMAS)"


def test_peft_loads_the_kv_adapter_and_computes_what_the_hooks_compute(trained):
    from peft import PeftModel

    tmp, results = trained
    team = results["kv"].team
    model, lora = team.receiver.model, team.receiver.kv_lora
    ids = torch.tensor([[5, 17, 33, 2, 81, 9]])
    with torch.no_grad(), tflow.patched(model, lora.delta()):
        hooked = model(ids).logits
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp / "out" / "kv"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, hooked, atol=1e-5, rtol=0)
        assert not torch.allclose(model(ids).logits, hooked)


def test_a_part_of_another_channel_or_receiver_is_refused(trained, tmp_path):
    tmp, results = trained
    lora = results["kv"].team.receiver.kv_lora
    with pytest.raises(CheckpointError, match="holds the latent channel's part, not the kv channel's"):
        kv_part.load(lora, tmp / "out" / "latent.safetensors", "kv")
    other = recipe(tmp_path, "model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1")
    with pytest.raises(CheckpointError, match="kv/adapter_model.safetensors was trained for another receiver"):
        tflow.load(other, checkpoint=tmp / "out")
    wider = recipe(tmp, "kv.rank=4")
    with pytest.raises(CheckpointError, match=r"holds a different kv part \(rank: checkpoint has 8"):
        tflow.load(wider, checkpoint=tmp / "out")


def test_kv_training_resumes(tmp_path):
    first = train(recipe(tmp_path, "train.channel=kv", "train.max_steps=5"), progress=False)
    resumed = train(recipe(tmp_path, "train.channel=kv", "train.max_steps=10"), resume=True, progress=False)
    assert (first.global_step, resumed.global_step) == (5, 10)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "out" / "kv-run" / "metrics.csv"))]
    assert min(steps) == 0 and max(steps) == 9


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tflow.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_eval_refuses_a_channel_the_folder_lacks_and_labels_untrained_kv(trained, tmp_path):
    tmp, _ = trained
    sets = [f"model.path={tmp}/model", "data.relay.n_test=4", "kv.latent_steps=2", "kv.targets=[q_proj,v_proj]"]
    run = cli("eval", RECIPE, *sets, "--checkpoint", tmp / "out", "--channels", "kv,weights", "--no-progress")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp / 'out'} has no weights part (generator.safetensors); train it with "
        f"`tflow train RECIPE train.channel=weights train.out_dir={tmp / 'out'}`"]
    run = cli("eval", RECIPE, *sets, "--channels", "latent", "--no-progress")
    assert run.returncode == 2 and "the latent channel needs a checkpoint with its latent links: pass --checkpoint DIR" in run.stderr
    run = cli("eval", RECIPE, *sets, "--channels", "none,kv", "--out", tmp_path, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "kv (LatentMAS)" in run.stdout and "kv (LatentMAS)" in (tmp_path / "report.md").read_text()


def test_the_answer_objective_teaches_the_inner_link_the_answer_after_the_prompt(tmp_path):
    from tflow.agents.encoding import token_ids
    from tflow.channels.latent.links import inner_loss
    from tflow.channels.latent.training import LatentModule
    from tflow.training.data import load_splits

    rec = recipe(tmp_path, "train.channel=latent", "latent.inner_text=answer")
    team = tflow.load(rec)
    module = LatentModule(team, load_splits(rec))
    sender, tok = team.senders[0], team.senders[0].tokenizer
    prompt, target = sender.prompt("What is the secret code of Lisbon?", "The secret code of Lisbon is 482."), "482"
    ids = token_ids(tok, [prompt])[0]
    answer = token_ids(tok, [target])[0] + [tok.eos_token_id]
    with torch.no_grad():
        full = torch.tensor([ids + answer])
        hidden = sender.model.base_model(input_ids=full).last_hidden_state
        embeds = sender.model.get_input_embeddings()(full)
    span = torch.zeros(1, full.shape[1] - 1, dtype=torch.bool)
    span[0, len(ids) - 1:] = True  # the prompt's last position predicts the answer's first token
    expected = inner_loss(team.receiver.links.inner[0], hidden[:, :-1], embeds[:, 1:], span)
    link = team.receiver.links.inner[0]
    got = module._text_inner_loss(link, sender, [prompt], [target])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # With a shorter batch-mate (left padding), the row's loss stays its own.
    pair = module._text_inner_loss(link, sender, [prompt, sender.prompt("Hi")], [target, target])
    alone = module._text_inner_loss(link, sender, [sender.prompt("Hi")], [target])
    assert abs(pair.item() - (got.item() + alone.item()) / 2) < 1e-4


def test_latent_training_learns_with_the_answer_objective(tmp_path):
    result = train(recipe(tmp_path, "train.channel=latent", "latent.inner_text=answer"), progress=False)
    losses = val_losses(tmp_path / "out" / "latent-run" / "metrics.csv")
    assert result.global_step == 15 and losses[-1] < losses[0] - 0.05, losses


def test_two_round_training_trains_the_feedback_link_and_the_receivers_inner_link(tmp_path):
    rec = recipe(tmp_path, "train.channel=latent", "latent.rounds=2")
    fresh = tflow.load(rec).receiver.links
    result = train(rec, progress=False)
    links = result.team.receiver.links
    for part in ("feedback", "receiver_inner"):
        before, after = getattr(fresh, part).state_dict(), getattr(links, part).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), part
    losses = val_losses(tmp_path / "out" / "latent-run" / "metrics.csv")
    assert losses[-1] < losses[0] - 0.05, losses
