"""The Lightning modules every channel's training builds on: the team held outside state_dict,
the optimizer and schedule, and steps that compute one loss per batch of examples."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from tflow.team import Team
from tflow.training.data import Splits
from tflow.training.objective import Objective


class ChannelModule(L.LightningModule):
    """Holds the team; a subclass registers the channel's trained part as its only submodule and
    says how to save it. The frozen backbones stay outside state_dict and DDP."""

    def __init__(self, team: Team, splits: Splits):
        super().__init__()
        self._team = (team,)  # a tuple keeps the frozen backbones out of state_dict and DDP
        self.task = splits.task
        self.objective = Objective(team.recipe.train, splits.teacher)

    @property
    def team(self) -> Team:
        return self._team[0]

    def save_part(self, out_dir: Path) -> Path:
        """Write the trained part into `out_dir` (safetensors); returns the file."""
        raise NotImplementedError(f"{type(self).__name__} must say how its part is saved")

    def on_fit_start(self) -> None:
        models = {id(a.model): a.model for a in [*self.team.senders, self.team.receiver]}
        for model in models.values():
            model.to(self.device)

    def answer_loss(self, logits: Tensor, labels: Tensor, examples) -> Tensor:
        """The recipe's objective (`train.objective`) on a batch's answer tokens; with a teacher its
        terms are logged too (`train_ce`, `train_distill`, `val_ce`, `val_distill`).

        logits [N, W, V], labels [N, W] (-100 off the answer; position t predicts label t + 1).
        """
        parts = self.objective.parts(logits, labels, examples)
        stage = "train" if self.training else "val"
        for name, value in parts.items():
            if name != "loss":
                self.log(f"{stage}_{name}", value.detach(), batch_size=len(examples), sync_dist=not self.training)
        return parts["loss"]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of Examples (text); tensors are made on the device in each step

    def configure_optimizers(self):
        train = self.team.recipe.train
        opt = torch.optim.AdamW(self.parameters(), lr=train.lr, weight_decay=train.weight_decay)

        def factor(step: int) -> float:  # linear warmup, then cosine decay to 10% of the peak
            if step < train.warmup_steps:
                return (step + 1) / (train.warmup_steps + 1)
            progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExampleModule(ChannelModule):
    """Steps that compute one loss per batch of examples, logged as train_loss and val_loss."""

    def batch_parts(self, examples):
        """The queries, per-sender contexts and answer targets of a batch."""
        queries = [self.task.prompt(ex) for ex in examples]
        contexts = [[ex.contexts.get(s.name) for ex in examples] for s in self.team.senders]
        targets = [self.task.target(ex, self.team.recipe.data.fields.answer) for ex in examples]
        return queries, contexts, targets

    def training_step(self, examples, batch_idx):
        loss = self.loss(examples)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(examples))
        return loss

    def validation_step(self, examples, batch_idx):
        self.log("val_loss", self.loss(examples), prog_bar=True, batch_size=len(examples), sync_dist=True)
