"""Training a control channel's receiver LoRA: the run's objective on the answer (`train.objective`),
the receiver reading the turn its channel gives it (no message, the senders' text messages, or
their documents)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from tflow.channels import registry
from tflow.channels.controls import Turns
from tflow.lora.patching import patched
from tflow.training.data import teacher_forced
from tflow.training.modules import ExampleModule


def control_module(channel: str, turns: Turns) -> type[ExampleModule]:
    """The Lightning module that trains `channel`'s receiver LoRA on the turns `turns` gives."""

    class ControlModule(ExampleModule):
        """Only the receiver LoRA (`lora`) learns; the turns are computed once per example (the
        senders are frozen and decode greedily, so a text message never changes)."""

        def __init__(self, team, splits):
            super().__init__(team, splits)
            self.lora = registry.trained_part(team.receiver, channel)
            self._turns: dict[tuple, str] = {}

        def save_part(self, out_dir: Path) -> Path:
            return registry.get(channel).part.save(self.lora, out_dir, self.team)

        def loss(self, examples) -> Tensor:
            queries, contexts, targets = self.batch_parts(examples)
            names = [s.name for s in self.team.senders]
            documents = [{n: c[i] for n, c in zip(names, contexts, strict=True) if c[i] is not None}
                         for i in range(len(queries))]
            keys = [(q, tuple(sorted(d.items()))) for q, d in zip(queries, documents, strict=True)]
            todo = [i for i, k in enumerate(keys) if k not in self._turns]
            if todo:
                made = turns(self.team, [queries[i] for i in todo], [documents[i] for i in todo])
                self._turns.update({keys[i]: turn for i, turn in zip(todo, made, strict=True)})
            receiver = self.team.receiver
            prompts = [receiver.prompt(self._turns[k]) for k in keys]
            ids, mask, labels = teacher_forced(receiver.tokenizer, prompts, targets, self.team.recipe.train.max_length,
                                               self.device)
            with patched(receiver.model, self.lora.delta(), validate=False):
                return self.answer_loss(receiver.model(input_ids=ids, attention_mask=mask).logits, labels, examples)

    ControlModule.__name__ = ControlModule.__qualname__ = f"{channel.capitalize()}ControlModule"
    return ControlModule
