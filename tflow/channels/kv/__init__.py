"""The `kv` channel (DiffMAS; LatentMAS while its LoRA is untrained): a shared KV trace the
receiver decodes on.

`run` builds the trace and decodes on it; its trained part is a receiver LoRA
(`tflow.channels.receiver_part`, saved in `kv/`) that `training` trains; `ablations` edits
traces; `settings` holds its options and recipe section `kv`.
"""

from __future__ import annotations

from tflow.agents.encoding import prompt_length
from tflow.channels.kv import ablations
from tflow.channels.kv.run import check, run
from tflow.channels.kv.settings import KVOptions, KVSection
from tflow.channels.receiver_part import receiver_lora_part
from tflow.channels.registry import Ablations, Channel, register
from tflow.evaluation.ablations import rows_of


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """One trace: every sender's turn and latent steps come before the receiver's prompt."""
    receiver, steps = team.receiver, options["latent_steps"]
    senders = sum(prompt_length(s, s.prompt(query, contexts.get(s.name))) + steps for s in team.senders)
    return [(receiver, senders + prompt_length(receiver, receiver.prompt(query)), max_tokens)]


def _module():
    from tflow.channels.kv.training import KVModule

    return KVModule


CHANNEL = register(Channel(
    "kv", run, context_use, check=check, options=KVOptions,
    settings=lambda recipe: KVOptions.model_validate(recipe.kv.model_dump(include=set(KVOptions.model_fields))).model_dump(),
    sections={"kv": KVSection},
    part=receiver_lora_part("kv", _module, kind="kv", attribute="kv_lora", noun="kv LoRA",
                            untrained_label="kv (LatentMAS)", checkpointing=False),
    message_keyword="message",
    ablations=Ablations(("shuffled", "static", "drop-sender"), ablations.kv_messages, ablations.ablate_kv, rows_of),
))
