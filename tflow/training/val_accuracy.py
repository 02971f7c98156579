"""Validation accuracy during training (`train.val_answers`): after each validation the channel
answers the first validation queries with its part as it stands, and `val_accuracy` is logged
beside val_loss, so a run's curve shows when it starts to carry the answer, not only its loss."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from tflow.evaluation.evaluate import run_channel
from tflow.tasks.base import Example


class ValAccuracy(L.Callback):
    """Logs `val_accuracy`: the share of `examples` the trained channel answers right (greedy, the
    recipe's `generate` settings, batches of `batch_size`) at each validation, step 0 included."""

    def __init__(self, channel: str, examples: Sequence[Example], batch_size: int):
        self.channel, self.examples, self.batch_size = channel, list(examples), batch_size

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not self.examples:
            return
        with torch.no_grad():
            result = run_channel(module.team, module.task, self.examples, self.channel, self.batch_size)
        # every process answers the same queries, so the mean over processes is that same value
        module.log("val_accuracy", result.accuracy, batch_size=len(self.examples), sync_dist=True)
