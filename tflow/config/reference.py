"""docs/recipes.md, rendered from the recipe schema: `python -m tflow.config.reference > docs/recipes.md`."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel

from tflow.config.base import inline_yaml, show
from tflow.config.explain import section_of
from tflow.config.recipe import recipe_model
from tflow.config.sections import ReceiverSection, SenderSection

_INTRO = """\
# Recipe reference

<!-- Generated from the schema in tflow/config/; do not edit by hand.
     Regenerate with: python -m tflow.config.reference > docs/recipes.md -->

A recipe is one YAML file describing a tflow setup: the agents, the parameter generator, the data,
training and decoding. Every command takes one (`tflow train RECIPE`, `tflow eval RECIPE`, ...)
and `tflow validate RECIPE` checks it without loading any weights.

```yaml
model:
  path: Qwen/Qwen3-4B
  dtype: bfloat16
senders:
  - name: strategist
    role: Explain how to approach the task, not the answer.
  - name: extractor
    role: List the facts, formulas and constraints the task needs. Do not solve it.
data:
  task: gsm8k
  source: openai/gsm8k
  config: main
train:
  max_steps: 1000
```

Only `model` and `senders` are required; every other key has the default listed below.

**Overrides.** Any key can be set on the command line as `key.path=value`, after the recipe:
`tflow train recipes/tiny.yaml train.max_steps=40 generator.targets=[q_proj,v_proj]
senders.0.role="Be brief."`. Values are parsed as YAML (`40` is an integer, `true` a boolean,
`[a,b]` a list, `null` unsets); list items are addressed by index (`senders.0.role`).
Overrides go through the same validation as the file.

**Errors.** Unknown keys are errors. Every problem is reported at once, one line each, with the
key path as you would type it in an override, e.g. `train.lr: must be > 0, got -1` or
`train.max_stepz: unknown key (did you mean max_steps?)`.

**Paths.** Relative paths (`model.path`, `data.source`, `train.out_dir`) resolve against the
current working directory, not the recipe's folder; a leading `~` is your home folder. A
`model.path` starting with `./`, `../`, `/` or `~` must exist unless `model.tiny` is set; a
`data.source` that looks like a local file (such a prefix, or a .json/.jsonl/.parquet/.csv name)
must exist. Anything else is a hub id.
"""


def reference_markdown() -> str:
    """docs/recipes.md, rendered from the schema's field docstrings (every registered channel's
    sections included, after the receiver's)."""
    schema = recipe_model()
    out = [_INTRO]
    sections = [("Top level", "", schema)]
    for name, field in schema.model_fields.items():
        if name in ("data", "train", "generate"):
            continue
        sections += _nested(name, f"{name}." if name != "senders" else "senders.N.", field.annotation)
    for name in ("data", "train", "generate"):
        sections += _nested(name, f"{name}.", schema.model_fields[name].annotation)
    for title, prefix, section in sections:
        out.append(f"\n## {title}\n\n{section.__doc__}\n")
        if section in (SenderSection, ReceiverSection):
            out.append(f"`{prefix}model` takes the same keys as [model](#model).\n")
        out.append("| key | type | default | description |\n|---|---|---|---|")
        for name, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else _doc_default(default)
            description = " ".join((field.description or "").split())
            out.append(f"| `{prefix}{name}` | {_doc_type(field)} | {default} | {description} |")
    return "\n".join(out) + "\n"


def _nested(title: str, prefix: str, annotation) -> list[tuple[str, str, type[BaseModel]]]:
    """The section at `title` and the sections inside it (model.tiny, data.fields, ...), in order."""
    section = section_of(annotation)
    if section is None:
        return []
    found = [(title, prefix, section)]
    for name, field in section.model_fields.items():
        if name != "model":  # an agent's own model takes the keys of the top-level model
            found += _nested(f"{title}.{name}", f"{prefix}{name}.", field.annotation)
    return found


def _doc_default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value}`" if isinstance(value, str) else f"`{inline_yaml(value)}`"


_DOC_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))


def _doc_type(field) -> str:
    text = _type_name(field.annotation)
    for meta in field.metadata:
        text += "".join(f", {sign} {show(getattr(meta, attr))}"
                        for cls, attr, sign in _DOC_BOUNDS if isinstance(meta, cls))
        if isinstance(meta, MinLen) and meta.min_length:
            text += ", not empty"
    return text


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return annotation.__name__


if __name__ == "__main__":
    print(reference_markdown(), end="")
