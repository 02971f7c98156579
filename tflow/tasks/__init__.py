"""Benchmark tasks by name: data loading, prompts and scorers (`get("gsm8k")`, `available()`)."""

from __future__ import annotations

from tflow.errors import DataError
from tflow.tasks.base import Example, Task
from tflow.tasks.code import MBPP, HumanEval
from tflow.tasks.gsm8k import GSM8K
from tflow.tasks.math_task import MATH
from tflow.tasks.mmlu import MMLURedux
from tflow.tasks.relay import Relay

_TASKS: dict[str, type[Task]] = {}

__all__ = ["Example", "Task", "available", "get", "register"]


def register(task: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass available as `data.task: <task.name>` and `--task`.

    Raises:
        ValueError: no name, or a task of that name is already registered.
    """
    if not task.name:
        raise ValueError(f"task class {task.__name__} has no name")
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered by {_TASKS[task.name].__name__}")
    _TASKS[task.name] = task
    return task


for _task in (GSM8K, MATH, MMLURedux, HumanEval, MBPP, Relay):
    register(_task)


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
