"""Pydantic's validation errors as short, actionable `key.path: message` lines."""

from __future__ import annotations

import re
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from tflow.config.base import show, suggest

_EXPECTED = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "a list", "dict": "a mapping", "model": "a section (a mapping of keys)",
    "model_attributes": "a section (a mapping of keys)",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def explain(error: dict, schema: type[BaseModel]) -> str | None:
    """A short, actionable `key.path: message` for one pydantic error (None for name-check errors)."""
    kind, loc, value, ctx = error["type"], error["loc"], error.get("input"), error.get("ctx", {})
    path = ".".join(map(str, loc))
    if kind == "recipe_names":
        return None  # reported by _raw_name_problems, which also runs when other sections fail
    if kind == "key_problem":  # a section's validator naming the key inside it
        return f"{path}.{ctx['key']}: {ctx['message']}" if path else f"{ctx['key']}: {ctx['message']}"
    if kind == "model_path_not_found":
        where = f"{path}." if path else ""
        return (f"{where}path: folder not found: {ctx['value']} "
                f"(set {where}tiny to build a tiny model there)")
    base = kind.removesuffix("_type").removesuffix("_parsing").removesuffix("_from_float")
    if kind == "missing":
        message = "field required"
    elif kind == "extra_forbidden":
        keys = _keys_at(schema, loc[:-1])
        listing = f" (expected one of: {', '.join(keys)})" if keys else ""
        hint = suggest(str(loc[-1]), keys) or listing
        message = "unknown key" + hint
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        message = f"must be {_BOUNDS[kind]} {show(bound)}, got {show(value)}"
    elif kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        message = f"must be one of {', '.join(choices)}, got {show(value)}"
        message += suggest(str(value), choices)
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif base in _EXPECTED:
        # YAML turns unquoted `yes`, `1.0` or `a: b` into other types; quoting keeps them text
        quote = " (quote it to keep it text)" if base == "string" else ""
        message = f"expected {_EXPECTED[base]}, got {show(value)}{quote}"
    else:
        message = error["msg"]
    return f"{path}: {message}" if path else message





def section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list):
        return next(filter(None, map(section_of, get_args(annotation))), None)
    return None


def _keys_at(schema: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys allowed in the section at `loc` (list indices skipped), for suggestions."""
    section: type[BaseModel] | None = schema
    for part in loc:
        if isinstance(part, int) or section is None:
            continue
        field = section.model_fields.get(part)
        section = section_of(field.annotation) if field else None
    return list(section.model_fields) if section else []
