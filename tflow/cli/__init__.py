"""The `tflow` command line: parse arguments, call the library, print.

Every command is registered with `command` (`tflow.cli.common`), which wraps it in `reports_errors`,
so a user mistake (any `TflowError`) ends as `error: ...` on stderr and exit code 2, never a
traceback. Commands that read a recipe take its overrides as positional key=value and as --set
key=value alike. Commands import what they need (torch, transformers, lightning) inside their body
so `tflow --help` stays instant.
"""

# isort: off
# Imported in this order so their @command calls register the commands in the order --help lists.
from tflow.cli import recipes, answers, programs  # noqa: F401
# isort: on
from tflow.cli.common import USAGE_ERROR, app, error_message, reports_errors

__all__ = ["USAGE_ERROR", "app", "error_message", "reports_errors"]
