"""tflow export: a query's fused delta as a PEFT LoRA adapter that peft loads to the same logits."""

import json

import pytest
import torch
from helpers import peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tflow
from tflow.channels.weights.export import query_delta
from tflow.cli import app
from tflow.config.recipe import load_recipe

QUERY = "What is the secret code of Lisbon?"
DOC = "The secret code of Lisbon is 482."


@pytest.fixture(scope="module")
def team(tiny_checkpoint):
    overrides, ckpt = tiny_checkpoint
    return tflow.load(load_recipe("recipes/tiny.yaml", overrides), ckpt)


def export(tiny_checkpoint, out, *extra):
    overrides, ckpt = tiny_checkpoint
    result = CliRunner().invoke(app, ["export", "recipes/tiny.yaml", "--checkpoint", str(ckpt), "--out", str(out),
                                      *extra, *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("contexts", [{}, {"reader": DOC}])
def test_exported_adapter_gives_the_patched_receivers_logits_in_peft(team, tiny_checkpoint, tmp_path, contexts):
    extra = [a for name, text in contexts.items() for a in ("--context", f"{name}={text}")]
    result = export(tiny_checkpoint, tmp_path, "--query", QUERY, *extra)
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'adapter_config.json'}",
                                          f"wrote {tmp_path / 'adapter_model.safetensors'}"]
    delta = query_delta(team, QUERY, contexts)
    rank = next(iter(delta.factors.values()))[0].shape[1]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", rank, rank)
    assert config["target_modules"] == sorted(delta.factors)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(delta.factors)
    for name, (a, b) in delta.factors.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], a[0])  # [r, in]
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], b[0] * delta.scale)  # [out, r]
    receiver = team.receiver
    ids = receiver.tokenizer([receiver.prompt(QUERY), "one two three"], return_tensors="pt", padding=True)
    with torch.no_grad():
        with tflow.patched(receiver.model, delta.expand(2)):
            patched = receiver.model(**ids).logits
        plain = receiver.model(**ids).logits
        served = peft_model(team, tmp_path)(**ids).logits
    assert (served - patched).abs().max().item() <= 1e-5
    assert (patched - plain).abs().max().item() > 1e-2  # the delta does change the logits


def test_an_adapter_missing_a_key_fails_the_strict_load(team, tiny_checkpoint, tmp_path):
    export(tiny_checkpoint, tmp_path, "--query", QUERY)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if ".layers.1.mlp.down_proj." not in k}, path)
    with pytest.raises(UserWarning, match="missing adapter keys"):
        peft_model(team, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--query", " "], "error: --query must not be empty"),
    (["--query", "Hi", "--context", "nobody"], "error: --context needs NAME=TEXT, got 'nobody'"),
    (["--query", "Hi", "--context", "nobody=x"], "error: --context names unknown sender(s) ['nobody']"),
    (["--query", "Hi", "--set", "generator.max_delta_norm=1e-9"],
     "error: no adapter written: the generated delta's norm"),
])
def test_export_mistakes_exit_2_with_one_line(tiny_checkpoint, tmp_path, extra, message):
    overrides, ckpt = tiny_checkpoint
    result = CliRunner().invoke(app, ["export", "recipes/tiny.yaml", "--checkpoint", str(ckpt), "--out",
                                      str(tmp_path / "out"), *extra, *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
