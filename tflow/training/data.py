"""Training data: a recipe's examples split into train and validation, and teacher-forced batches."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from torch import Tensor

from tflow.agents.encoding import pad_batch, token_ids
from tflow.config.sections import RelaySection
from tflow.errors import DataError
from tflow.tasks import Example, Task, get, relay
from tflow.training.checkpoint import RECIPE_FILE

if TYPE_CHECKING:
    from tflow.training.teacher import TeacherTargets


@dataclass(frozen=True)
class Splits:
    """Train and validation examples with the task that prompts and scores them, and, for a
    distillation objective, the teacher's targets for them (`tflow.training.teacher.prepare`)."""

    train: list[Example]
    val: list[Example]
    task: Task
    teacher: TeacherTargets | None = None


def load_splits(recipe) -> Splits:
    """The recipe's training and validation examples, per-sender contexts attached.

    Raises:
        DataError: no data section, an unloadable source, or a missing field.
    """
    data = recipe.data
    if data is None:
        raise DataError("the recipe has no data section; set data.task or data.source")
    if data.task == "relay":
        train, val, _ = relay_splits(recipe)
        return Splits(train[: data.limit], val[: data.limit], get("relay"))
    task = get(data.task) if data.task else Task()
    fields = _mapped_fields(data)
    train = task.load(data.source, config=data.config, split=data.split, fields=fields)
    if data.val_split:
        val = task.load(data.source, config=data.config, split=data.val_split, fields=fields)
    else:
        train = train[:]
        random.Random(recipe.seed).shuffle(train)
        cut = max(1, round(len(train) * data.val_fraction))
        if cut >= len(train):
            raise DataError(f"data: {len(train)} examples are too few to hold out a validation split; set "
                            "data.val_split to a split of its own, or lower data.val_fraction")
        train, val = train[cut:], train[:cut]
    contexts = data.fields.context
    return Splits(_with_contexts(train[: data.limit], contexts), _with_contexts(val[: data.limit], contexts), task)


def relay_splits(recipe) -> tuple[list[Example], list[Example], list[Example]]:
    """Relay train, validation and held-out test examples for the recipe's `data.relay` settings and
    sender names. No test fact (entity, value) is in any training or validation context; validation
    is drawn like training, with a seed of its own."""
    settings = (recipe.data.relay if recipe.data else None) or RelaySection()
    options = dict(senders=[s.name for s in recipe.senders], format=settings.format, facts=settings.facts)
    train, test = relay.split(settings.seed, settings.n_train, settings.n_test, **options)
    used = {fact for example in test for fact in example.meta["facts"]}
    val = relay.generate(settings.n_val, settings.seed + 2, exclude=used, **options)
    return train, val, test


def eval_examples(recipe, task: Task, split: str = "test", limit: int | None = None) -> list[Example]:
    """The first `limit` examples to evaluate `task` on: relay's held-out test split, else `split`.

    Where the recipe's data section is for `task`, its source, config, fields and contexts apply;
    otherwise the task's default source.

    Raises:
        DataError: a negative limit, relay with a split other than "test", or an unloadable source.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if task.name == "relay":
        if split != "test":
            raise DataError(f"the relay task is evaluated on its held-out test split, got split {split!r}")
        return relay_splits(recipe)[2][:limit]
    data = recipe.data if recipe.data is not None and recipe.data.task == task.name else None
    if data is None:
        return task.load(split=split, limit=limit)
    fields = _mapped_fields(data)
    examples = task.load(data.source, config=data.config, split=split, limit=limit, fields=fields)
    return _with_contexts(examples, data.fields.context)


def _mapped_fields(data) -> dict[str, str]:
    """The question/answer columns the recipe sets; the task's own mapping stands for the rest
    (HumanEval's question is its `prompt` column, not a `question` column)."""
    return {role: getattr(data.fields, role) for role in ("question", "answer") if role in data.fields.model_fields_set}


def _with_contexts(examples: list[Example], columns: dict[str, str]) -> list[Example]:
    if not columns:
        return examples
    out = []
    for ex in examples:
        missing = [c for c in columns.values() if c not in ex.meta]
        if missing:
            raise DataError(f"data.fields.context: column(s) {missing} not in the dataset; columns: {sorted(ex.meta)}")
        out.append(replace(ex, contexts={name: str(ex.meta[col]) for name, col in columns.items()}))
    return out


def teacher_forced(tokenizer, prompts: Sequence[str], targets: Sequence[str], max_length: int,
                   device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt + target + EOS; labels are -100 except on target tokens and EOS.

    Returns ids [N, T], attention mask [N, T] and labels [N, T].
    """
    seqs, labels = teacher_forced_ids(tokenizer, prompts, targets, max_length)
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "right", device)
    return ids, mask.long(), pad_batch(labels, -100, "right", device)[0]


def teacher_forced_ids(tokenizer, prompts: Sequence[str], targets: Sequence[str],
                       max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per row, the ids of prompt + target + EOS and their labels (-100 on the prompt), cut to max_length."""
    seqs, labels = [], []
    for p, t in zip(token_ids(tokenizer, prompts), token_ids(tokenizer, targets), strict=True):
        seqs.append((p + t + [tokenizer.eos_token_id])[:max_length])
        labels.append(([-100] * len(p) + t + [tokenizer.eos_token_id])[:max_length])
    return seqs, labels


def training_splits(checkpoint, task: str) -> set[str]:
    """The splits of `task` the checkpoint's training read: the one it trained on and the one it
    validated on (its own split too when validation held out a fraction of it). Relay's test split
    is never among them. Empty without a checkpoint recipe.yaml or for another task."""
    if checkpoint is None:
        return set()
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    if not (folder / RECIPE_FILE).is_file():
        return set()
    data = (yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}).get("data") or {}
    if data.get("task") != task:
        return set()
    if task == "relay":
        return {"train", "val"}
    return {data.get("split", "train"), data.get("val_split") or data.get("split", "train")}


def check_eval_split(checkpoint, task: str, split: str, allow: bool) -> bool:
    """Whether `split` is one the checkpoint trained or validated on (allowed only with `allow`).

    Raises:
        DataError: it is, and `allow` is false.
    """
    used = split in training_splits(checkpoint, task)
    if used and not allow:
        raise DataError(f"checkpoint {checkpoint} was trained or validated on the {task} split {split!r}; evaluate "
                        "on a held-out split (--split test), or pass --on-training-split to do it anyway (the "
                        "report then says so)")
    return used
