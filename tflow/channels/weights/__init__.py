"""The `weights` channel (TFlow): sender states -> generator -> fused per-query LoRA delta patched
into the receiver.

One query through it: `run` (encode the senders, generate, guard, patch, decode), with the
generator's pieces beside it: `conditioning` (layer aggregation), `hypernetwork` (the generator
from `generators/` plus fusion gates and the copy head), `fusion` (exact rank-concatenation),
`copy_head`; its trained part (`part`), the Lightning module that trains it (`training`), its
ablations and delta diagnostics (`diagnostics`), its recipe sections (`settings`) and `export`
(a query's delta as a PEFT adapter).
"""

from __future__ import annotations

from tflow.agents.encoding import prompt_length
from tflow.channels.registry import Ablations, Channel, TrainedPart, register
from tflow.channels.weights import diagnostics, part
from tflow.channels.weights.run import check, run
from tflow.channels.weights.settings import FusionSection, GeneratorSection
from tflow.evaluation.ablations import ABLATIONS


def context_use(team, query: str, contexts, max_tokens: int, options) -> list:
    """The receiver reads its own prompt and answers; every sender reads its prompt once."""
    receiver = team.receiver
    return [(receiver, prompt_length(receiver, receiver.prompt(query)), max_tokens),
            *((s, prompt_length(s, s.prompt(query, contexts.get(s.name))), 0) for s in team.senders)]


def _module():
    from tflow.channels.weights.training import GeneratorModule

    return GeneratorModule


CHANNEL = register(Channel(
    "weights", run, context_use, check=check,
    sections={"generator": GeneratorSection, "fusion": FusionSection},
    part=TrainedPart(
        part.GENERATOR_FILE, "generator", "generator", part.build,
        save=lambda hypernet, out_dir, team: part.save(hypernet, out_dir, team.recipe),
        load=lambda hypernet, path, team: part.load(hypernet, path),
        module=_module, attribute="generator", run_dir="",
        describe=lambda recipe: f"{recipe.generator.kind} generator"),
    message_keyword="delta",
    ablations=Ablations(ABLATIONS, diagnostics.collect, diagnostics.ablate, diagnostics.delta_rows,
                        diagnostics.summarize, diagnostics.check),
))
