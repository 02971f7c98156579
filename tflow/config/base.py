"""What every recipe section shares: the pydantic base (unknown keys are errors) and the
helpers its validators and error messages use."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class Section(BaseModel):
    """A recipe section: unknown keys are errors; the docstring under each field is its reference."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def looks_local(path: str, suffixes: Sequence[str] = ()) -> bool:
    """Whether `path` is unmistakably a local path (`org/name` may be a hub id)."""
    return path.startswith(("./", "../", "/", "~")) or path.lower().endswith(tuple(suffixes))


def home(path: str) -> str:
    """`path` with a leading `~` or `~user` expanded, as a shell would (unchanged for an unknown user)."""
    return os.path.expanduser(path)


def show(value: Any) -> str:
    """A value in an error message, as the user would write it in YAML (strings quoted), kept short."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = inline_yaml(value)
    return text if len(text) <= 60 else text[:57] + "..."


def inline_yaml(value: Any) -> str:
    """A value as inline YAML (`null`, `true`, `[a, b]`)."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
        return text.strip().removesuffix("...").strip()
    except yaml.YAMLError:  # not plain data (an object passed from Python)
        return repr(value)


def suggest(word: str, choices: Sequence[str]) -> str:
    """` (did you mean X?)` for the closest of `choices`, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unique_items(items: list | None) -> list | None:
    """A list validator: no item twice."""
    dupes = sorted({x for x in items or () if items.count(x) > 1}, key=str)
    if dupes:
        raise ValueError(f"lists {', '.join(map(str, dupes))} more than once")
    return items


def layer_indices(layers: list[int] | None) -> list[int] | None:
    """A validator of `layers`: null (every layer) or a non-empty list of indices >= 0."""
    if layers == []:
        raise ValueError("must not be empty (null patches every layer)")
    if layers and min(layers) < 0:
        raise ValueError(f"must be layer indices >= 0, got {show(layers)}")
    return layers
