"""ValAccuracy: the share of the first validation queries the channel answers right, logged once per validation."""

from types import SimpleNamespace

import pytest

from tflow.tasks.base import Example
from tflow.training.val_accuracy import ValAccuracy


class Team:
    """Answers right every query whose answer is even, through the channel it is asked for."""

    def __init__(self):
        self.calls = []

    def communicate(self, queries, channel, contexts):
        self.calls.append((channel, len(queries)))
        return [SimpleNamespace(text=q.split()[-1] if int(q.split()[-1]) % 2 == 0 else "no") for q in queries]


class Module:
    def __init__(self):
        self.team, self.logged = Team(), []
        self.task = SimpleNamespace(prompt=lambda ex: ex.question, score=lambda reply, ex: float(reply == ex.answer))

    def log(self, name, value, batch_size, sync_dist):
        self.logged.append((name, value, batch_size, sync_dist))


def examples(n):
    return [Example(question=f"say {i}", answer=str(i)) for i in range(n)]


def test_logs_the_share_answered_right_in_batches():
    module = Module()
    ValAccuracy("kv", examples(7), batch_size=3).on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    assert module.logged == [("val_accuracy", pytest.approx(4 / 7), 7, True)]  # 0, 2, 4, 6 of 0..6
    assert module.team.calls == [("kv", 3), ("kv", 3), ("kv", 1)]


def test_nothing_during_the_sanity_check_or_without_queries():
    module = Module()
    ValAccuracy("weights", examples(4), 2).on_validation_epoch_end(SimpleNamespace(sanity_checking=True), module)
    ValAccuracy("weights", [], 2).on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    assert module.logged == [] and module.team.calls == []
