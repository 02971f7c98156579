"""The `tflow` app and what every command shares: error handling, help text, recipe arguments.

Every command is registered with `command`, which wraps it in `reports_errors`, so a user mistake
(any `TflowError`) ends as `error: ...` on stderr and exit code 2, never a traceback. Commands that
read a recipe take its overrides as positional key=value and as --set key=value alike. Commands
import what they need (torch, transformers, lightning) inside their body so `tflow --help` stays
instant.
"""

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tflow import __version__
from tflow.errors import RecipeError, TflowError

app = typer.Typer(
    name="tflow",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # a bug's traceback must not dump tensors and weights
)

USAGE_ERROR = 2
Command = TypeVar("Command", bound=Callable)


def error_message(err: TflowError) -> str:
    """The text the CLI prints for a user mistake: one line, or a header and one line per problem."""
    if isinstance(err, RecipeError) and len(err.problems) > 1:
        lines = [f"error: {err.source or 'recipe'}: {len(err.problems)} problems"]
        return "\n".join(lines + [f"  {problem}" for problem in err.problems])
    return f"error: {err}"


def reports_errors(command: Command) -> Command:
    """Decorate a command so a `TflowError` prints `error_message` to stderr and exits with 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TflowError as err:
            typer.echo(error_message(err), err=True)
            raise typer.Exit(USAGE_ERROR) from None

    return run


def prose(doc: str) -> str:
    """A docstring as help text, each paragraph on one line: rich markup mode keeps single line
    breaks, so the docstring's source wrapping would break --help lines mid-sentence."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


def command(name: str | None = None) -> Callable[[Command], Command]:
    """Register a command: its docstring is its help (`prose`), and it `reports_errors`."""

    def register(function: Command) -> Command:
        return app.command(name, help=prose(function.__doc__))(reports_errors(function))

    return register


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True,
                     help="Show the version and exit."),
    ] = False,
) -> None:
    """Weight-space communication for teams of LLM agents: senders talk to a receiver through
    per-query LoRA deltas."""


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(
    metavar="KEY=VALUE", show_default=False,
    help="Recipe overrides as key.path=value, e.g. train.max_steps=40 (or give each as --set).")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", show_default=False,
    help="A recipe override key.path=value, the same as a positional one (repeatable).")]


def overrides_of(positional: list[str] | None, options: list[str] | None) -> list[str]:
    """The overrides given as positional key=value and as --set key=value, in that order."""
    return [*(positional or ()), *(options or ())]


def parse_contexts(items: list[str] | None) -> dict[str, str]:
    """--context NAME=TEXT options as {sender name: document}.

    Raises:
        QueryError: an item without `=` or without a name.
    """
    from tflow.errors import QueryError

    contexts = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise QueryError(f"--context needs NAME=TEXT, got {item!r}")
        contexts[name] = text
    return contexts


def check_senders(contexts: dict[str, str], recipe) -> None:
    """Check that every --context names one of the recipe's senders.

    Raises:
        QueryError: a name no sender has.
    """
    from tflow.errors import QueryError

    names = [s.name for s in recipe.senders]
    unknown = sorted(set(contexts) - set(names))
    if unknown:
        raise QueryError(f"--context names unknown sender(s) {unknown}; senders: {names}")


def note_random_backbone(team) -> None:
    """One line on stderr when the receiver runs on a tiny backbone with random weights."""
    from tflow.backbones.tiny import is_random

    if is_random(team.receiver.model):
        typer.echo(f"note: the receiver's backbone {team.receiver.model.name_or_path} is a tiny model with random "
                   "weights (built from model.tiny), so its answers are noise; for meaningful answers run `tflow "
                   "demo`, which teaches a tiny backbone the relay format first", err=True)


ContextOption = Annotated[list[str] | None, typer.Option(
    "--context", metavar="NAME=TEXT", show_default=False,
    help="A sender's private document for this query, as NAME=TEXT (repeatable).")]
