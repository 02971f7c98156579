"""Benchmark tasks by name: data loading, prompts and scorers (`get("gsm8k")`, `available()`)."""

from __future__ import annotations

from tflow.errors import DataError
from tflow.tasks.base import Example, Task
from tflow.tasks.code import MBPP, HumanEval
from tflow.tasks.gsm8k import GSM8K
from tflow.tasks.math_task import MATH
from tflow.tasks.mmlu import MMLURedux
from tflow.tasks.relay import Relay

_TASKS: dict[str, type[Task]] = {task.name: task for task in (GSM8K, MATH, MMLURedux, HumanEval, MBPP, Relay)}

__all__ = ["Example", "Task", "available", "get"]


def available() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def get(name: str) -> Task:
    """A fresh instance of the task registered as `name`.

    Raises:
        DataError: no task has that name.
    """
    if name not in _TASKS:
        raise DataError(f"unknown task {name!r}; available: {', '.join(available())}")
    return _TASKS[name]()
