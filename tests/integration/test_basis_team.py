"""The basis generator through the product: training, checkpoints, the weights channel, export."""

import copy
import csv
import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import tflow
from tflow.channels.weights import part as weights_part
from tflow.channels.weights.export import export_adapter, query_delta
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import CheckpointError
from tflow.lora.basis import BasisDelta
from tflow.training.loop import train

QUESTIONS = ["What is the secret code of Lisbon?", "What is the password of Oslo?", "What is the secret code of Rome?"]
CONTEXTS = [{"reader": "The secret code of Lisbon is 123."}, {"reader": "The password of Oslo is tiger."},
            {"reader": "The secret code of Rome is 905."}]


def recipe(tmp, *extra):
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tmp}/model", f"train.out_dir={tmp}/out", "train.val_every=10", "train.max_steps=40",
        "data.relay.n_train=256", "data.relay.n_test=32", "generator.kind=basis", "generator.rank=8", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basis")
    return tmp, train(recipe(tmp), progress=False)


def test_val_loss_falls_and_the_checkpoint_holds_the_basis(trained):
    tmp, result = trained
    rows = [r for r in csv.DictReader(open(result.out_dir / "metrics.csv")) if r["val_loss"]]
    losses = [float(r["val_loss"]) for r in rows]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1, losses
    loaded = tflow.load(recipe(tmp), checkpoint=result.out_dir)
    state = loaded.receiver.generator.state_dict()
    assert any(k.startswith("generator.detokenizer.u.") for k in state)
    for k, v in result.team.receiver.generator.state_dict().items():
        assert torch.equal(state[k], v), k
    assert [r.text for r in loaded.communicate(QUESTIONS, contexts=CONTEXTS)] == [
        r.text for r in result.team.communicate(QUESTIONS, contexts=CONTEXTS)]


def test_a_query_gets_the_same_reply_alone_and_in_a_batch(trained):
    _, result = trained
    team = result.team
    together = team.communicate(QUESTIONS, contexts=CONTEXTS)
    assert together[0].message_bytes == 14 * 8 * 8 * 4  # 14 modules, one 8 x 8 float32 core each
    for q, c, reply in zip(QUESTIONS, CONTEXTS, together, strict=True):
        alone = team.communicate([q], contexts=[c])[0]
        assert alone.text == reply.text and alone.usage.total_tokens == reply.usage.total_tokens
        assert alone.delta_applied and reply.delta_applied


@pytest.mark.parametrize("kinds", [("basis", "mlp"), ("mlp", "basis")])
def test_a_checkpoint_of_the_other_generator_kind_is_a_one_line_error(trained, tmp_path, kinds):
    saved, wanted = kinds
    tmp, result = trained
    folder = result.out_dir
    if saved == "mlp":

        team = tflow.load(recipe(tmp, "generator.kind=mlp", "generator.rank=4"))
        weights_part.save(team.receiver.generator, tmp_path / "mlp")
        folder = tmp_path / "mlp"
    with pytest.raises(CheckpointError) as err:
        tflow.load(recipe(tmp, f"generator.kind={wanted}", "generator.rank=8"), checkpoint=folder)
    message = str(err.value)
    assert f"generator.kind: checkpoint has '{saved}', this receiver has '{wanted}'" in message
    assert len(message.splitlines()) == 1
    overrides = [f"model.path={tmp}/model", f"generator.kind={wanted}", "generator.rank=8"]
    cli = CliRunner().invoke(app, ["ask", "recipes/tiny.yaml", "Hi", "--checkpoint", str(folder),
                                   *[a for o in overrides for a in ("--set", o)]])
    assert cli.exit_code == 2 and len(cli.stderr.splitlines()) == 1 and "different generator" in cli.stderr


def test_exported_basis_adapter_has_rank_k_and_gives_the_patched_logits_in_peft(trained, tmp_path):
    _, result = trained
    team = result.team
    delta = query_delta(team, QUESTIONS[0], CONTEXTS[0])
    assert isinstance(delta, BasisDelta)
    export_adapter(team, QUESTIONS[0], tmp_path, CONTEXTS[0])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, (u, v) in delta.basis.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], u)
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_B.weight"],
                                   delta.scale * v @ delta.cores[name][0])
    receiver = team.receiver
    ids = receiver.tokenizer([receiver.prompt(QUESTIONS[0])], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        served = PeftModel.from_pretrained(copy.deepcopy(receiver.model), str(tmp_path)).eval()
    with torch.no_grad():
        with tflow.patched(receiver.model, delta):
            patched = receiver.model(**ids).logits
        plain = receiver.model(**ids).logits
        assert (served(**ids).logits - patched).abs().max().item() <= 1e-5
    assert (patched - plain).abs().max().item() > 1e-3
