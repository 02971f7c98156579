"""The recipe: the YAML that drives training, evaluation and `tflow ask`, validated all at once.

`load_recipe(path, overrides)` reads YAML, applies `key.path=value` overrides, validates against the
schema and raises one `RecipeError` listing every problem as `key.path: message`, with the key path
exactly as the user writes it. The schema is the sections every team has (`tflow.config.sections`)
plus the sections each registered channel owns (`Channel.sections`: generator, fusion, kv, latent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError, to_jsonable_python

from tflow.config.base import Section
from tflow.config.explain import explain
from tflow.config.overrides import collect_overrides, load_yaml
from tflow.config.sections import (
    DataSection,
    GenerateSection,
    ModelSection,
    ReceiverSection,
    SenderSection,
    TrainSection,
)
from tflow.errors import RecipeError


class Recipe(Section):
    """A complete tflow setup: agents, each channel's settings, data, training and decoding."""

    # The fields are `recipe_model()`'s: the agents' sections, the ones each registered channel
    # owns, then data, train, generate and seed.

    @model_validator(mode="after")
    def _names_agree(self) -> Recipe:
        problems = _name_problems(
            [s.name for s in self.senders], self.receiver.name,
            list(self.data.fields.context) if self.data else [],
        )
        if problems:
            raise PydanticCustomError("recipe_names", "{message}", {"message": "; ".join(problems)})
        return self

    @model_validator(mode="after")
    def _checkpointing_allowed(self) -> Recipe:
        from tflow.channels import registry

        part = registry.get(self.train.channel).part
        if self.train.gradient_checkpointing and part is not None and not part.checkpointing:
            raise ValueError(f"train.gradient_checkpointing: must be false with train.channel={self.train.channel} "
                             "(HF drops the past cache a trace is read with while checkpointing)")
        return self

    def to_dict(self) -> dict:
        """The resolved recipe (every default filled in) as plain YAML-safe data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, for saving beside checkpoints; `load_recipe` reads it back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


_AGENTS = {
    "model": (ModelSection, Field(description="The shared frozen backbone of every agent without its own `model`.")),
    "senders": (list[SenderSection], Field(min_length=1, description="The sender agents, in order.")),
    "receiver": (ReceiverSection, Field(default_factory=ReceiverSection, description="The receiver agent.")),
}
_RUN = {
    "data": (DataSection | None, Field(None, description="The dataset; needed by train and eval, not by ask or demo.")),
    "train": (TrainSection, Field(default_factory=TrainSection, description="Training settings.")),
    "generate": (GenerateSection, Field(default_factory=GenerateSection, description="Decoding settings.")),
    "seed": (int, Field(0, description="Global seed (generator init, data shuffling, sampling).")),
}
_MODELS: dict[tuple, type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """The schema for the channels registered now: the agents' sections, every channel's sections,
    then data, train, generate and seed."""
    from tflow.channels import registry

    sections = {key: section for channel in registry.channels() for key, section in channel.sections.items()}
    key = tuple(sections.items())
    if key not in _MODELS:
        fields: dict[str, Any] = {
            name: (section, Field(default_factory=section, description=_first_sentence(section.__doc__)))
            for name, section in sections.items()}
        _MODELS[key] = create_model("Recipe", __base__=Recipe, __doc__=Recipe.__doc__, **_AGENTS, **fields, **_RUN)
    return _MODELS[key]


def schema_defaults() -> dict:
    """{dotted.key: default} of every recipe key that has a default, in the schema registered now
    (`recipe_model`), as `to_dict` would write it."""

    def walk(model, prefix: str) -> dict:
        out = {}
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out.update(walk(field.annotation, f"{prefix}{name}."))
            elif not field.is_required():
                out[f"{prefix}{name}"] = to_jsonable_python(field.get_default(call_default_factory=True))
        return out

    return walk(recipe_model(), "")


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def load_recipe(source: str | Path | Mapping, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe from a YAML file (or take a mapping), apply `key.path=value` overrides, validate.

    Relative paths inside the recipe resolve against the current working directory.

    Raises:
        RecipeError: listing every problem at once: a missing file, a YAML syntax error (with its
            line), malformed overrides and every schema violation as `key.path: message`.
    """
    where = None
    if isinstance(source, Mapping):
        data = source
    else:
        where = str(source)
        data = _read_yaml(Path(source))
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise RecipeError([f"a recipe must be a mapping of sections (model, senders, ...), got {got}"],
                          where)
    data, problems = collect_overrides(data, overrides)
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as err:
        explained = [m for e in err.errors() if (m := explain(e, recipe_model()))] + _raw_name_problems(data)
        problems += explained or [str(err)]
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), where)
    return recipe


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError([f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8"], str(path)) from None
    except OSError as err:
        raise RecipeError([f"cannot read the recipe: {err.strerror or err}"], str(path)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError([f"{line}invalid YAML: {err.problem or err.context}"], str(path)) from None
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {err}"], str(path)) from None


def _name_problems(senders: list[str | None], receiver: str, context_keys: list[str]) -> list[str]:
    """Cross-section name checks; `senders` holds each sender's name (None where it has none yet)."""
    problems, first = [], {}
    for i, name in enumerate(senders):
        if name is None:
            continue
        if name == receiver:
            problems.append(f"senders.{i}.name: {name!r} is the receiver's name; "
                            "give the sender another name")
        elif name in first:
            problems.append(f"senders.{i}.name: duplicate sender name {name!r} "
                            f"(also senders.{first[name]}.name)")
        first.setdefault(name, i)
    for key in context_keys:
        if key not in first:
            problems.append(f"data.fields.context.{key}: no sender named {key!r} "
                            f"(senders: {', '.join(first)})")
    return problems


def _raw_name_problems(data: Mapping) -> list[str]:
    """`_name_problems` on unvalidated data, so name clashes are reported beside any other problem."""
    senders = data.get("senders")
    receiver = data.get("receiver")
    fields = data.get("data", {}).get("fields", {}) if isinstance(data.get("data"), Mapping) else {}
    context = fields.get("context") if isinstance(fields, Mapping) else None
    return _name_problems(
        [s.get("name") if isinstance(s, Mapping) and isinstance(s.get("name"), str) else None
         for s in (senders if isinstance(senders, list) else [])],
        receiver["name"] if isinstance(receiver, Mapping) and isinstance(receiver.get("name"), str)
        else ReceiverSection.model_fields["name"].default,
        [str(k) for k in context] if isinstance(context, Mapping) else [],
    )

