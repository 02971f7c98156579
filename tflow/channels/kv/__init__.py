"""The `kv` channel (DiffMAS; LatentMAS while its LoRA is untrained): a shared KV trace the
receiver decodes on.

`run` builds the trace and decodes on it; `lora` is the receiver's LoRA, `part` builds, saves and
loads it, `training` trains it, `ablations` edits traces, `settings` holds its options and recipe
section `kv`.
"""

from __future__ import annotations

from tflow.agents.encoding import prompt_length
from tflow.channels.kv import ablations, part
from tflow.channels.kv.run import check, run
from tflow.channels.kv.settings import KVOptions, KVSection
from tflow.channels.registry import Ablations, Channel, TrainedPart, register
from tflow.evaluation.ablations import rows_of


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """One trace: every sender's turn and latent steps come before the receiver's prompt."""
    receiver, steps = team.receiver, options["latent_steps"]
    senders = sum(prompt_length(s, s.prompt(query, contexts.get(s.name))) + steps for s in team.senders)
    return [(receiver, senders + prompt_length(receiver, receiver.prompt(query)), max_tokens)]


def _module():
    from tflow.channels.kv.training import KVModule

    return KVModule


def _save(lora, out_dir, team):
    from tflow.lora.peft_format import base_model_name

    return part.save(lora, out_dir, team.recipe, base_model_name(team.receiver.model))


CHANNEL = register(Channel(
    "kv", run, context_use, check=check, options=KVOptions,
    settings=lambda recipe: KVOptions.model_validate(recipe.kv.model_dump(include=set(KVOptions.model_fields))).model_dump(),
    sections={"kv": KVSection},
    part=TrainedPart(
        part.KV_FILE, "kv", "kv LoRA", part.build, _save,
        load=lambda lora, path, team: part.load(lora, path),
        module=_module, attribute="kv_lora", optional=True, is_zero=lambda lora: lora.is_zero(),
        untrained_label="kv (LatentMAS)", checkpointing=False),
    message_keyword="message",
    ablations=Ablations(("shuffled", "static", "drop-sender"), ablations.kv_messages, ablations.ablate_kv, rows_of),
    summary="senders build one KV trace the receiver decodes on (DiffMAS; LatentMAS untrained)",
))
