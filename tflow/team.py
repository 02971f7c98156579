"""tflow.load: a recipe (and optionally a trained checkpoint) -> a ready Team of agents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tflow.agents.agent import Receiver, Sender
from tflow.backbones.devices import agents_device
from tflow.backbones.loading import load_backbone
from tflow.channels import communicate, registry
from tflow.reply import Reply


@dataclass(eq=False)
class Team:
    """Senders and a receiver (with each channel's trained part) built from one recipe."""

    senders: list[Sender]
    receiver: Receiver
    recipe: object
    checkpoint: Path | None = None
    trained: frozenset[str] = frozenset()
    """The channels whose trained parts came from `checkpoint`."""

    def communicate(self, query: str | Sequence[str], channel: str = "weights", **generation) -> Reply | list[Reply]:
        """tflow.communicate with the recipe's `generate` settings and the channel's own options as
        the recipe sets them (`Channel.settings`) as defaults."""
        settings = {**decoding(self.recipe), **channel_settings(self.recipe, channel), **generation}
        return communicate(self.senders, self.receiver, query, channel=channel, **settings)

    def label(self, channel: str) -> str:
        """The channel's name in reports: `kv (LatentMAS)` while the kv LoRA is untrained."""
        return registry.get(channel).label(self.receiver)


def decoding(recipe) -> dict:
    """The receiver's decoding settings of a recipe's `generate` section (`communicate` keywords)."""
    return recipe.generate.model_dump(exclude={"message_tokens"})


def channel_settings(recipe, channel: str) -> dict:
    """The options a recipe sets for `channel` (`Channel.settings`), as `communicate` takes them."""
    settings = registry.get(channel).settings
    return settings(recipe) if settings is not None else {}


def load(recipe: str | Path | Mapping, checkpoint: str | Path | None = None, overrides: Sequence[str] = ()) -> Team:
    """Build the team of a recipe; with `checkpoint`, load every trained part it holds (checked first).

    Without a checkpoint every part is fresh (`TrainedPart.build`): the generator's B heads and the
    kv LoRA's B are zero, exact no-ops (so kv is LatentMAS); the latent links are random. A
    checkpoint folder may hold the parts of several channels (`tflow.training.checkpoint`);
    `Team.trained` says which it had. A backbone shared by several agents is loaded once; agents
    may run different backbones (other widths, depths, tokenizers), each sender backbone with its
    own conditioning.

    Raises:
        RecipeError, ModelLoadError, TargetError, CheckpointError, DeviceError (a device missing
        here, a dtype it cannot compute in, or agents on different devices).
    """
    from tflow.config.recipe import Recipe, load_recipe
    from tflow.training import checkpoint as ckpt

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    parts = ckpt.trained_parts(checkpoint) if checkpoint is not None else {}  # fail before loading weights
    agents_device(recipe)
    cache: dict[str, tuple] = {}

    def backbone(section, where: str, agent: str):
        where, section = (where, section) if section is not None else ("model", recipe.model)
        key = section.model_dump_json()
        if key not in cache:
            cache[key] = load_backbone(section, where, agent)
        return cache[key]

    senders = []
    for i, s in enumerate(recipe.senders):
        model, tokenizer = backbone(s.model, f"senders.{i}.model", f"sender {s.name!r}")
        senders.append(Sender(model, tokenizer, s.role, s.name, s.context, s.context_position))
    model, tokenizer = backbone(recipe.receiver.model, "receiver.model", f"receiver {recipe.receiver.name!r}")
    receiver = Receiver(model, tokenizer, recipe.receiver.system_prompt, name=recipe.receiver.name)
    for channel in registry.channels():  # in registration order: each part's initialisation is reproducible
        if channel.part is not None:
            registry.set_trained_part(receiver, channel.name, channel.part.build(recipe, senders, receiver))
    team = Team(senders, receiver, recipe, Path(checkpoint) if checkpoint is not None else None, frozenset(parts))
    for name, path in parts.items():
        registry.get(name).part.load(registry.trained_part(receiver, name), path, team)
    return team
