"""The `latent` channel (RecursiveMAS): latent thoughts through trained links, spliced into the
receiver's prompt.

`run` rolls the thoughts out and decodes; `links` are the InnerLinks and OuterLinks, `part`
builds, saves and loads them, `training` trains them, `ablations` edits thoughts, `settings`
holds its options and recipe section `latent`.
"""

from __future__ import annotations

from tflow.agents.encoding import prompt_length, token_ids
from tflow.channels.latent import ablations, part
from tflow.channels.latent.run import SLOT, check, receiver_turn, run
from tflow.channels.latent.settings import LatentOptions, LatentSection
from tflow.channels.registry import Ablations, Channel, TrainedPart, register
from tflow.evaluation.ablations import rows_of


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """Each sender's thoughts take positions in its own rollout and in the receiver's prompt."""
    receiver, steps = team.receiver, options["latent_steps"]
    turn = receiver_turn(receiver, query, [s.name for s in team.senders])
    mine = sum(map(len, token_ids(receiver.tokenizer, turn.split(SLOT)))) + steps * len(team.senders)
    return [(receiver, mine, max_tokens),
            *((s, prompt_length(s, s.prompt(query, contexts.get(s.name))), steps) for s in team.senders)]


def _module():
    from tflow.channels.latent.training import LatentModule

    return LatentModule


CHANNEL = register(Channel(
    "latent", run, context_use, check=check, options=LatentOptions,
    settings=lambda recipe: LatentOptions.model_validate(
        recipe.latent.model_dump(include=set(LatentOptions.model_fields))).model_dump(),
    sections={"latent": LatentSection},
    part=TrainedPart(
        part.LATENT_FILE, "latent", "latent links", part.build,
        save=lambda links, out_dir, team: part.save(links, out_dir, part.fingerprint(team.senders, team.receiver),
                                                    team.recipe),
        load=lambda links, path, team: part.load(links, path, part.fingerprint(team.senders, team.receiver)),
        module=_module, attribute="links", checkpointing=False),
    message_keyword="message",
    ablations=Ablations(("shuffled", "static", "drop-sender"), ablations.latent_messages, ablations.ablate_latent,
                        rows_of),
))
