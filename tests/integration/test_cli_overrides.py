"""Every command that reads a recipe takes its overrides both as positional key=value and as --set key=value."""

import pytest
import yaml
from typer.testing import CliRunner

import tflow.config.recipe
from tflow.cli import app
from tflow.errors import RecipeError

runner = CliRunner()
RECIPE = "recipes/tiny.yaml"

# Each command's arguments up to where its overrides go, and the options it needs to reach the recipe.
COMMANDS = {
    "validate": (["validate", RECIPE], []),
    "train": (["train", RECIPE], []),
    "eval": (["eval", RECIPE], ["--channels", "none"]),
    "ask": (["ask", RECIPE, "What is the code?"], ["--channel", "none"]),
    "serve": (["serve", RECIPE], ["--port", "0"]),
    "export": (["export", RECIPE], ["--checkpoint", "{ckpt}", "--query", "hi", "--out", "{tmp}/adapter"]),
    "demo": (["demo"], ["--out", "{tmp}/demo", "--threads", "2"]),
}
FORMS = {
    "positional": ["a.b=1", "c=two"],
    "set": ["--set", "a.b=1", "--set", "c=two"],
    "both": ["a.b=1", "--set", "c=two"],
}


@pytest.fixture
def overrides_read(monkeypatch):
    """The overrides each call of load_recipe gets; the call then stops the command."""
    calls = []

    def record(path, overrides=()):
        calls.append(list(overrides))
        raise RecipeError(["stopped after reading the overrides"])

    monkeypatch.setattr(tflow.config.recipe, "load_recipe", record)
    return calls


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", COMMANDS)
def test_both_forms_reach_the_recipe_in_order(name, form, overrides_read, tiny_checkpoint, tmp_path):
    head, options = COMMANDS[name]
    fill = {"ckpt": str(tiny_checkpoint[1]), "tmp": str(tmp_path)}
    result = runner.invoke(app, [*head, *FORMS[form], *(o.format(**fill) for o in options)])
    assert result.exit_code == 2 and result.stderr == "error: stopped after reading the overrides\n", result.output
    assert len(overrides_read) == 1
    assert overrides_read[0][:2] == ["a.b=1", "c=two"]  # the demo then adds its own (train.out_dir=...)


def test_set_and_positional_overrides_resolve_alike():
    shown = {}
    for form, args in {"positional": ["generator.rank=2", "train.max_steps=7"],
                       "set": ["--set", "generator.rank=2", "--set", "train.max_steps=7"]}.items():
        result = runner.invoke(app, ["validate", RECIPE, *args, "--show"])
        assert result.exit_code == 0, result.output
        shown[form] = result.stdout
    assert shown["positional"] == shown["set"]
    resolved = yaml.safe_load(shown["set"].rsplit("ok: ", 1)[0])
    assert (resolved["generator"]["rank"], resolved["train"]["max_steps"]) == (2, 7)


def test_a_later_set_overrides_an_earlier_positional():
    result = runner.invoke(app, ["validate", RECIPE, "generator.rank=2", "--set", "generator.rank=3"])
    assert result.exit_code == 0 and result.stdout.endswith("generator mlp rank 3)\n"), result.output
