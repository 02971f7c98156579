"""Training the kv channel's part (DiffMAS): the senders build the KV trace without gradient and
without the adapter; the receiver reads its prompt and the gold answer on it with its LoRA patched
in, the run's objective on the answer tokens (`train.objective`). Every LLM stays frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tflow.agents.encoding import pad_batch
from tflow.agents.generation import GenerationSettings
from tflow.channels import registry
from tflow.channels.dispatch import sender_names
from tflow.channels.kv.run import build_trace
from tflow.channels.registry import Call
from tflow.lora.patching import patched
from tflow.training.data import teacher_forced_ids
from tflow.training.modules import ExampleModule


class KVModule(ExampleModule):
    """The kv channel: only the receiver's LoRA (`lora`) is trained."""

    def __init__(self, team, splits):
        super().__init__(team, splits)
        self.lora = team.receiver.kv_lora

    def save_part(self, out_dir: Path) -> Path:
        return registry.get("kv").part.save(self.lora, out_dir, self.team)

    def loss(self, examples) -> Tensor:
        team, kv = self.team, self.team.recipe.kv
        receiver = team.receiver
        queries, contexts, targets = self.batch_parts(examples)
        call = Call(team.senders, receiver, queries, GenerationSettings(), sender_names(team.senders, receiver),
                    contexts, options={"latent_steps": kv.latent_steps, "realign": kv.realign})
        with torch.no_grad():
            trace = build_trace(call)[0]
        tok = receiver.tokenizer
        seqs, labels = teacher_forced_ids(tok, [receiver.prompt(q) for q in queries], targets,
                                          team.recipe.train.max_length)
        with patched(receiver.model, self.lora.delta(), validate=False):
            logits = trace.append_ids(seqs, tok.pad_token_id, full=True).logits
        return self.answer_loss(logits, pad_batch(labels, -100, "left", trace.device)[0], examples)
