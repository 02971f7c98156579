"""`tflow --help` and each command's --help read cleanly: whole sentences, nothing eaten as markup."""

import re

import pytest
import typer.main
from typer.testing import CliRunner

from tflow.cli import app
from tflow.cli.common import prose

runner = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


def show(args: list[str], columns: int) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """The help text without the panels' borders, every run of whitespace one space."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def option_help(name: str) -> list[str]:
    """The help of each option and argument of a command, as it should read (markup escapes removed)."""
    return [p.help.replace("\\[", "[") for p in GROUP.commands[name].params if getattr(p, "help", None)]


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)], ids=["tflow", *COMMANDS])
def test_help_fits_the_terminal_and_has_no_stray_spaces(args, columns):
    text = show(args, columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    assert not re.search(r" [.,;:)]", flat(text)), flat(text)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_paragraph_and_option_help_shows_whole(name):
    text = show([name], 1000)  # wide enough that only the help's own line breaks could break a line
    lines = [line.strip() for line in text.splitlines()]
    for paragraph in prose(GROUP.commands[name].callback.__doc__).split("\n\n"):
        assert paragraph in lines
    for help_text in option_help(name):
        assert help_text in flat(text)


def test_the_command_list_gives_each_summary_on_one_line():
    text = show([], 1000)
    for name in COMMANDS:
        summary = prose(GROUP.commands[name].callback.__doc__).split("\n\n")[0]
        assert re.search(rf"│ {name} +{re.escape(summary)} +│", text), summary


def test_a_default_written_in_the_help_is_not_eaten_as_markup():
    text = flat(show(["eval"], 100))
    assert "Task to evaluate [default: the recipe's data.task]." in text
    assert "ddp (or auto) [default: one process; ddp when --devices or --num-nodes asks for more]." in text
