"""The generator registry: each kind registers its class (`@register("kind")`), built by `kind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from generators.base import Generator
from tflow.backbones.families import ReceiverSpec
from tflow.errors import RecipeError

_REGISTRY: dict[str, type[Generator]] = {}


def register(name: str) -> Callable[[type[Generator]], type[Generator]]:
    """Class decorator: make a Generator subclass buildable as `kind: name`.

    Raises:
        ValueError: `name` is already registered.
    """

    def decorate(cls: type[Generator]) -> type[Generator]:
        if name in _REGISTRY:
            raise ValueError(f"generator {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Registered generator kinds, in registration order."""
    return list(_REGISTRY)


def get(kind: str) -> type[Generator]:
    """The generator class registered as `kind`.

    Raises:
        RecipeError: no generator has that kind (the message lists those that do).
    """
    if kind not in _REGISTRY:
        raise RecipeError([f"generator.kind: unknown generator {kind!r}; available: {', '.join(available())}"])
    return _REGISTRY[kind]


def build(config: Mapping[str, Any], spec: ReceiverSpec, sender_hidden_size: int) -> Generator:
    """A fresh generator of `config["kind"]` emitting factors for every module of `spec`.

    Raises:
        RecipeError: unknown or missing kind, unknown keys, or invalid values (all reported at once).
    """
    kind = config.get("kind")
    if kind not in _REGISTRY:
        what = "is required" if kind is None else f"unknown generator {kind!r}"
        raise RecipeError([f"generator.kind: {what}; available: {', '.join(available())}"])
    return _REGISTRY[kind](spec, config, sender_hidden_size)
