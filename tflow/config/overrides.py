"""Command-line overrides: `key.path=value` pairs applied to a recipe's data before validation."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from tflow.errors import RecipeError


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each `key.path=value` override set; `data` is left untouched.

    Values are parsed as YAML (`40` int, `1e-3` float, `true` bool, `[q_proj,v_proj]` list,
    `null` None, anything else a string); digits in the key path index lists (`senders.0.role`).
    Types are checked later by the recipe schema.

    Raises:
        RecipeError: one message per malformed override (no `=`, empty key or value, empty key
            segment, a list index out of range, a path through a non-section).
    """
    result, problems = collect_overrides(data, overrides)
    if problems:
        raise RecipeError(problems)
    return result


def collect_overrides(data: Mapping, overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """Like `apply_overrides`, but returns the problems instead of raising (good overrides applied)."""
    result = copy.deepcopy(dict(data))
    problems = []
    for override in overrides:
        try:
            keys, value = _parse(override)
            _set(result, keys, value)
        except _BadOverride as err:
            problems.append(str(err))
    return result, problems


class _BadOverride(Exception):
    pass


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`; every failure is a `yaml.YAMLError`, nesting too deep included."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as err:  # a value the constructor cannot build, e.g. an integer of 5000 digits
        raise yaml.YAMLError(str(err)) from None


def _parse(override: str) -> tuple[list[str], Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        hint = f" (write {key}=null for none)" if sep and key else ""
        raise _BadOverride(f"{key or 'override'}: override needs key=value, got {override!r}{hint}")
    keys = key.split(".")
    if not all(keys):
        raise _BadOverride(f"{key}: empty key segment in override {override!r}")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err) or "not valid YAML"
        raise _BadOverride(
            f"{key}: cannot parse value {text!r} ({problem}); quote it to pass a string"
        ) from None
    return keys, value


def _set(data: dict, keys: list[str], value: Any) -> None:
    node: Any = data
    path = ".".join(keys)
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth]) or "the recipe"
        if isinstance(node, list):
            if not key.isdigit():
                raise _BadOverride(f"{path}: {here} is a list; index it, e.g. {here}.0.{key}")
            key = int(key)
            if key > len(node):
                raise _BadOverride(f"{path}: index {key} out of range ({here} has {len(node)} items)")
            if key == len(node):  # one past the end appends an item
                node.append(None)
        elif not isinstance(node, dict):
            raise _BadOverride(f"{path}: {here} is {node!r}, not a section")
        if depth == len(keys) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = node[key] = {}
        node = child
