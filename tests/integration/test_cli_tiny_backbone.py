"""A tiny random backbone over the CLI: its build is announced, its answers come with a note, and it is
never built at a path shaped like a hub id."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tflow.backbones import tiny
from tflow.cli import app

runner = CliRunner()
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
SMALL = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
         "model.tiny.num_kv_heads=1", "generator.d_model=16", "generate.max_new_tokens=2"]
NOTE = ("note: the receiver's backbone {path} is a tiny model with random weights (built from model.tiny), so its "
        "answers are noise; for meaningful answers run `tflow demo`, which teaches a tiny backbone the relay "
        "format first")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model as model.tiny builds it (random), and one saved from Python as the demo saves its own."""
    tmp = tmp_path_factory.mktemp("tiny")
    random = tiny.build(tmp / "random", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    saved = tmp / "saved"
    tok = tiny.tokenizer()
    tiny.model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1).save_pretrained(saved)
    tok.save_pretrained(saved)
    return random, saved


def ask(path, *extra):
    return runner.invoke(app, ["ask", RECIPE, "What is the code?", f"model.path={path}", *SMALL,
                               "--channel", "none", *extra])


def test_ask_on_a_random_backbone_ends_with_the_note(folders):
    random, _ = folders
    result = ask(random)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("[none] tokens ") and lines[1:] == [NOTE.format(path=random)]


def test_ask_on_a_saved_backbone_has_no_note(folders):
    _, saved = folders
    result = ask(saved)
    assert result.exit_code == 0, result.output
    assert len(result.stderr.splitlines()) == 1 and "note:" not in result.stderr


def test_eval_on_a_random_backbone_ends_with_the_note(folders, tmp_path):
    random, _ = folders
    result = runner.invoke(app, ["eval", RECIPE, f"model.path={random}", *SMALL, "data.relay.n_test=2",
                                 "--channels", "none", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == NOTE.format(path=random)


def test_the_first_ask_announces_the_build(tmp_path):
    result = ask(tmp_path / "model")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == f"building a tiny random qwen3 model at {tmp_path / 'model'}"
    assert lines[-1] == NOTE.format(path=tmp_path / "model")


def test_a_hub_id_is_never_built_as_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ask("Qwen/Qwen3-0.6B")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == ("error: model.path: 'Qwen/Qwen3-0.6B' looks like a hub id, but model.tiny builds a "
                             "random model there; give a local folder such as ./models/tiny, or set model.tiny=null "
                             "to load the hub model\n")
    assert list(tmp_path.iterdir()) == []
