"""ValAccuracy: the share of the first validation queries the channel answers right, logged once per validation."""

from types import SimpleNamespace

import pytest

from tflow.reply import Reply, Usage
from tflow.tasks import relay
from tflow.training.val_accuracy import ValAccuracy

EXAMPLES = relay.generate(7, seed=0, senders=["reader"])


class Team:
    """Answers right the queries of the even-numbered examples, through the channel it is asked for."""

    def __init__(self):
        self.calls, self.receiver = [], SimpleNamespace(name="executor")

    def label(self, channel):
        return channel

    def communicate(self, queries, channel, contexts):
        self.calls.append((channel, len(queries)))
        right = {relay.Relay().prompt(ex): i % 2 == 0 for i, ex in enumerate(EXAMPLES)}
        answers = {relay.Relay().prompt(ex): ex.answer for ex in EXAMPLES}
        return [Reply(answers[q] if right[q] else "nothing", channel, Usage({})) for q in queries]


class Module:
    def __init__(self):
        self.team, self.task, self.logged = Team(), relay.Relay(), []

    def log(self, name, value, batch_size, sync_dist):
        self.logged.append((name, value, batch_size, sync_dist))


def test_logs_the_share_answered_right_in_batches():
    module = Module()
    ValAccuracy("kv", EXAMPLES, batch_size=3).on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    assert module.logged == [("val_accuracy", pytest.approx(4 / 7), 7, True)]  # examples 0, 2, 4, 6
    assert module.team.calls == [("kv", 3), ("kv", 3), ("kv", 1)]


def test_nothing_during_the_sanity_check_or_without_queries():
    module = Module()
    ValAccuracy("weights", EXAMPLES, 2).on_validation_epoch_end(SimpleNamespace(sanity_checking=True), module)
    ValAccuracy("weights", [], 2).on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    assert module.logged == [] and module.team.calls == []
