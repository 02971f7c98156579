"""tflow.load: a recipe (and optionally a trained checkpoint) -> a ready Team of agents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tflow.agents import Receiver, Sender
from tflow.channels import communicate
from tflow.channels.dispatch import sender_names
from tflow.channels.kv_lora import KVLoRA
from tflow.channels.links import Links
from tflow.checkpoint import backbone_fingerprint
from tflow.copy_head import lm_head
from tflow.encoding import backbone_groups
from tflow.errors import RecipeError
from tflow.hypernetwork import Hypernetwork
from tflow.models import load_backbone
from tflow.reply import Reply
from tflow.spec import ReceiverSpec


@dataclass(eq=False)
class Team:
    """Senders and a receiver (with its generator) built from one recipe."""

    senders: list[Sender]
    receiver: Receiver
    recipe: object
    checkpoint: Path | None = None
    trained: frozenset[str] = frozenset()
    """The channels whose trained parts came from `checkpoint`."""

    def communicate(self, query: str | Sequence[str], channel: str = "weights", **generation) -> Reply | list[Reply]:
        """tflow.communicate with the recipe's `generate` settings (and the kv or latent section's
        for those channels) as defaults."""
        settings = {**self.recipe.generate.model_dump(), **channel_settings(self.recipe, channel), **generation}
        return communicate(self.senders, self.receiver, query, channel=channel, **settings)

    def label(self, channel: str) -> str:
        """The channel's name in reports: `kv (LatentMAS)` while the kv LoRA is untrained."""
        lora = self.receiver.kv_lora
        return "kv (LatentMAS)" if channel == "kv" and (lora is None or lora.is_zero()) else channel


def channel_settings(recipe, channel: str) -> dict:
    """The communicate options a recipe sets for `channel` beyond its `generate` section."""
    if channel == "kv":
        return {"latent_steps": recipe.kv.latent_steps, "realign": recipe.kv.realign}
    if channel == "latent":
        return {"latent_steps": recipe.latent.latent_steps, "rounds": recipe.latent.rounds}
    return {}


def load(recipe: str | Path | Mapping, checkpoint: str | Path | None = None, overrides: Sequence[str] = ()) -> Team:
    """Build the team of a recipe; with `checkpoint`, load every trained part it holds (checked first).

    Without a checkpoint every part is fresh: the generator's B heads and the kv LoRA's B are zero,
    exact no-ops (so kv is LatentMAS); the latent links are random. A checkpoint folder may hold
    the parts of several channels (`tflow.checkpoint`); `Team.trained` says which it had.
    A backbone shared by several agents is loaded once; agents may run different backbones (other
    widths, depths, tokenizers), each sender backbone with its own conditioning.

    Raises:
        RecipeError, ModelLoadError, TargetError, CheckpointError.
    """
    from tflow import checkpoint as ckpt
    from tflow.recipe import Recipe, load_recipe

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    parts = ckpt.trained_parts(checkpoint) if checkpoint is not None else {}  # fail before loading weights
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
    receiver.generator = build_hypernetwork(recipe, senders, receiver)
    receiver.kv_lora = build_kv_lora(recipe, receiver)
    receiver.links = build_links(recipe, senders, receiver)
    if "weights" in parts:
        ckpt.load_into(receiver.generator, parts["weights"])
    if "kv" in parts:
        ckpt.load_kv(receiver.kv_lora, parts["kv"])
    if "latent" in parts:
        ckpt.load_links(receiver.links, parts["latent"], ckpt.links_fingerprint(senders, receiver))
    return Team(senders, receiver, recipe, Path(checkpoint) if checkpoint is not None else None, frozenset(parts))


def build_hypernetwork(recipe, senders: Sequence[Sender], receiver: Receiver) -> Hypernetwork:
    """A fresh hypernetwork for the recipe's generator, on the receiver's device: a layer
    aggregation (and, where widths differ, a projection) per sender backbone."""
    g = recipe.generator
    spec = ReceiverSpec.from_model(receiver.model, g.targets, g.layers)
    groups = backbone_groups(senders)
    configs = [senders[groups.index(k)].model.config for k in range(max(groups) + 1)]
    fingerprints = [{"name": name, **backbone_fingerprint(s.model)}
                    for name, s in zip(sender_names(senders, receiver), senders, strict=True)]
    hypernet = Hypernetwork(spec, g.model_dump(exclude={"targets", "layers", "max_delta_norm", "copy_head"}),
                            len(senders), [c.num_hidden_layers + 1 for c in configs], [c.hidden_size for c in configs],
                            recipe.fusion.gate_init, g.max_delta_norm, groups=groups, senders=fingerprints,
                            copy=copy_target(senders, receiver) if g.copy_head else None)
    return hypernet.to(next(receiver.model.parameters()).device)


def copy_target(senders: Sequence[Sender], receiver: Receiver) -> tuple[str, int, int]:
    """The receiver's LM head (name, in, out features) for `generator.copy_head`.

    Raises:
        RecipeError: a sender on another backbone or tokenizer than the receiver, or no LM head.
    """
    name, head = lm_head(receiver.model)
    for who, s in zip(sender_names(senders, receiver), senders, strict=True):
        if s.model is not receiver.model and s.tokenizer.get_vocab() != receiver.tokenizer.get_vocab():
            raise RecipeError([f"generator.copy_head: sender {who!r} tokenizes differently from the receiver, "
                               "so its token ids name other tokens; use one backbone or set copy_head: false"])
    return name, head.in_features, head.out_features


def build_kv_lora(recipe, receiver: Receiver) -> KVLoRA:
    """A fresh kv LoRA (zero B: the kv channel is LatentMAS) for the recipe's `kv` section."""
    kv = recipe.kv
    lora = KVLoRA(ReceiverSpec.from_model(receiver.model, kv.targets, kv.layers), kv.rank, kv.alpha, recipe.seed)
    return lora.to(next(receiver.model.parameters()).device)


def build_links(recipe, senders: Sequence[Sender], receiver: Receiver) -> Links:
    """Fresh latent-channel links for the recipe's `latent` section, on the receiver's device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        links = Links([s.model.config.hidden_size for s in senders], receiver.model.config.hidden_size,
                      recipe.latent.hidden).match_embeddings([s.model for s in senders], receiver.model)
    return links.to(next(receiver.model.parameters()).device)
