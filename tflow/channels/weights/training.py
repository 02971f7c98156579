"""Training the weights channel's part: only the hypernetwork (generator, layer aggregation,
fusion gates) learns; senders and receiver stay frozen.

The loss is the run's objective (`train.objective`) on the receiver's teacher-forced answer
tokens with the generated delta in its slot. The delta stays attached from the forward until
after backward, because gradient checkpointing re-runs the receiver's forward inside backward.
"""

from __future__ import annotations

from pathlib import Path

from tflow.agents.encoding import encode
from tflow.channels.weights import part
from tflow.lora.patching import attach, detach, patched
from tflow.team import Team
from tflow.training.data import Splits, teacher_forced
from tflow.training.modules import ChannelModule


class GeneratorModule(ChannelModule):
    """The weights channel: only `hypernet` (generator, layer aggregation, fusion gates) is trained."""

    def __init__(self, team: Team, splits: Splits):
        super().__init__(team, splits)
        self.hypernet = team.receiver.generator

    def save_part(self, out_dir: Path) -> Path:
        return part.save(self.hypernet, out_dir, self.team.recipe)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        receiver = self.team.receiver.model
        if self.team.recipe.train.gradient_checkpointing:
            receiver.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            receiver.train()  # HF checkpoints only in training mode; the backbones have no dropout on

    def _delta_and_batch(self, examples):
        team, recipe = self.team, self.team.recipe
        queries = [self.task.prompt(ex) for ex in examples]
        contexts = [[ex.contexts.get(s.name) for ex in examples] for s in team.senders]
        delta = self.hypernet(encode(team.senders, queries, contexts))
        prompts = [team.receiver.prompt(q) for q in queries]
        targets = [self.task.target(ex, recipe.data.fields.answer) for ex in examples]
        ids, mask, labels = teacher_forced(team.receiver.tokenizer, prompts, targets, recipe.train.max_length, self.device)
        return delta, dict(input_ids=ids, attention_mask=mask), labels

    def training_step(self, examples, batch_idx):
        receiver = self.team.receiver.model
        detach(receiver)  # a step that failed before its backward leaves nothing behind
        delta, batch, labels = self._delta_and_batch(examples)
        attach(receiver, delta, validate=False)
        loss = self.answer_loss(receiver(**batch).logits, labels, examples)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(examples))
        return loss

    def on_after_backward(self) -> None:
        detach(self.team.receiver.model)

    def on_train_end(self) -> None:
        detach(self.team.receiver.model)

    def validation_step(self, examples, batch_idx):
        delta, batch, labels = self._delta_and_batch(examples)
        with patched(self.team.receiver.model, delta, validate=False):
            loss = self.answer_loss(self.team.receiver.model(**batch).logits, labels, examples)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(examples), sync_dist=True)
