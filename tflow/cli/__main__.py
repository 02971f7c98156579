"""`python -m tflow.cli`: the command line."""

from tflow.cli import app

app()
