"""ask, eval, serve and export find a wrong channel, task, sender or question before any weights load."""

import pytest
from typer.testing import CliRunner

import tflow.team
from tflow.cli import app

runner = CliRunner()


@pytest.fixture
def loads(monkeypatch):
    """Every backbone load the command attempts (none is carried out)."""
    calls = []

    def refuse(section, *args, **kwargs):
        calls.append(section.path)
        raise RuntimeError("a backbone was loaded")

    monkeypatch.setattr(tflow.team, "load_backbone", refuse)
    return calls


def recipe(tmp_path) -> list[str]:
    """The tiny recipe with its model at a folder a load would build."""
    return ["recipes/tiny.yaml", f"model.path={tmp_path}/model"]


CASES = [
    ("ask_unknown_channel", ["ask", "{recipe}", "hi", "{path}", "--channel", "smoke"],
     "error: unknown channel 'smoke'; choose one of: none, text, weights"),
    ("ask_empty_question", ["ask", "{recipe}", "", "{path}", "--channel", "none"],
     "error: the question must not be empty"),
    ("ask_blank_question", ["ask", "{recipe}", " \n ", "{path}", "--channel", "none"],
     "error: the question must not be empty"),
    ("ask_unknown_sender", ["ask", "{recipe}", "hi", "{path}", "--channel", "none", "--context", "writer=a doc"],
     "error: --context names unknown sender(s) ['writer']; senders: ['reader']"),
    ("eval_unknown_channel", ["eval", "{recipe}", "{path}", "--channels", "none,smoke"],
     "error: unknown channel(s) 'smoke'; choose from: none, text, weights"),
    ("eval_unknown_task", ["eval", "{recipe}", "{path}", "--channels", "none", "--task", "gsm9k"],
     "error: unknown task 'gsm9k'; available: "),
    ("serve_bad_recipe", ["serve", "{recipe}", "{path}", "generator.rank=0", "--port", "0"],
     "error: recipes/tiny.yaml: generator.rank: must be > 0, got 0"),
    ("export_unknown_sender", ["export", "{recipe}", "{path}", "--checkpoint", "{ckpt}", "--query", "hi",
                               "--out", "{tmp}/adapter", "--context", "writer=a doc"],
     "error: --context names unknown sender(s) ['writer']; senders: ['reader']"),
    ("export_blank_query", ["export", "{recipe}", "{path}", "--checkpoint", "{ckpt}", "--query", " ",
                            "--out", "{tmp}/adapter"],
     "error: --query must not be empty"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_mistake_is_reported_before_any_backbone_loads(tmp_path, loads, tiny_checkpoint, args, message):
    _, ckpt = tiny_checkpoint
    recipe_file, path = recipe(tmp_path)
    fill = {"recipe": recipe_file, "path": path, "ckpt": str(ckpt), "tmp": str(tmp_path)}
    result = runner.invoke(app, [a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
    assert loads == [] and not (tmp_path / "model").exists()


def test_with_the_mistake_fixed_the_loader_is_reached(tmp_path, loads):
    recipe_file, path = recipe(tmp_path)
    result = runner.invoke(app, ["ask", recipe_file, "hi", path, "--channel", "none", "--context", "reader=a doc"])
    assert isinstance(result.exception, RuntimeError) and loads == [f"{tmp_path}/model"]
