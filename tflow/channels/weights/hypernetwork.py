"""Hypernetwork: sender states -> one fused per-query delta (aggregation, generator, fusion)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import generators
from tflow.agents.encoding import SenderStates
from tflow.backbones.families import ReceiverSpec
from tflow.channels.weights.conditioning import LayerAggregation
from tflow.channels.weights.copy_head import CopyHead
from tflow.channels.weights.fusion import Delta, Fusion, fuse
from tflow.errors import ModelLoadError
from tflow.lora.delta import LoRADelta, pad_right


class Hypernetwork(nn.Module):
    """The trainable part of the weight channel; everything a generator checkpoint holds.

    `config` records what is needed to rebuild it: the generator config, the number of senders,
    the sender layer count and hidden size, and the fusion gate's initial value.
    `max_delta_norm` is a run-time bound, not part of the checkpoint: the weights channel applies
    no query's delta whose `LoRADelta.row_norms()` exceeds it (None: no bound).

    Senders on several backbones (`groups[s]`: sender s's backbone group, as `backbone_groups`
    numbers them; `sender_layers` and `sender_hidden` then one per group) get a layer aggregation
    per group, `aggregation[str(g)]`, and a linear projection, `projection[str(g)]`, from each
    group narrower than the widest into the widest width, which the generator reads. One backbone
    keeps one `aggregation` and no projection. A generator kind that `reads_layers` gets no
    aggregation: it reads the states entering each patched layer (`layer_states`), projected
    alike. `senders` (each sender's name and backbone fingerprint,
    `checkpoint.backbone_fingerprint`) is recorded in checkpoints and checked on load.
    `copy` (the receiver's LM head: module name, in and out features) adds a `CopyHead` whose
    factors join every sender's delta; it needs senders on one backbone that tokenizes like the
    receiver (`tflow.channels.weights.part.build` checks that).
    """

    def __init__(self, spec: ReceiverSpec, generator: Mapping, num_senders: int, sender_layers: int | Sequence[int],
                 sender_hidden: int | Sequence[int], gate_init: float = 1.0, max_delta_norm: float | None = None, *,
                 groups: Sequence[int] | None = None, senders: Sequence[Mapping] | None = None,
                 copy: tuple[str, int, int] | None = None):
        super().__init__()
        layers = [sender_layers] if isinstance(sender_layers, int) else list(sender_layers)
        hidden = [sender_hidden] if isinstance(sender_hidden, int) else list(sender_hidden)
        self.groups = tuple(groups) if groups is not None else (0,) * num_senders
        if len(self.groups) != num_senders or len(layers) != len(hidden) or sorted(set(self.groups)) != list(range(len(layers))):
            raise ModelLoadError(f"sender groups {list(self.groups)} do not fit {num_senders} senders on "
                                 f"{len(layers)} backbones")
        self.spec = spec
        self.max_delta_norm = max_delta_norm
        self.senders = [dict(s) for s in senders] if senders is not None else None
        self.shapes = list(zip(layers, hidden, strict=True))
        self.width = max(hidden)
        self.config = {"generator": None, "num_senders": num_senders}
        # A generator that reads each layer's states has no use for a layer aggregation.
        aggregates = not generators.get(generator["kind"]).reads_layers
        if len(layers) == 1:  # the single-backbone layout (and parameter names) of every earlier checkpoint
            self.aggregation = LayerAggregation(layers[0]) if aggregates else None
            self.config.update(sender_layers=layers[0], sender_hidden=hidden[0])
        else:
            self.aggregation = nn.ModuleDict({str(g): LayerAggregation(n) for g, n in enumerate(layers) if aggregates})
            self.projection = nn.ModuleDict({str(g): nn.Linear(h, self.width) for g, h in enumerate(hidden)
                                             if h != self.width})
            self.config.update(sender_layers=layers, sender_hidden=hidden, sender_groups=list(self.groups))
        self.generator = generators.build(dict(generator), spec, self.width)
        self.fusion = Fusion(num_senders, gate_init)
        self.config.update(generator=self.generator.config, gate_init=gate_init)
        self.copy = None
        if copy is not None:  # recorded only when on, so checkpoints from before it still load
            if len(layers) != 1:
                raise ModelLoadError("generator.copy_head needs every sender on one backbone")
            name, hidden_in, vocab = copy
            self.copy = CopyHead(name, self.width, hidden_in, vocab)
            self.config.update(copy_head={"module": name, "in": hidden_in, "out": vocab})

    def forward(self, states: SenderStates) -> Delta:
        """One delta with a row per query: the senders' shares fused."""
        return fuse(self.shares(states))

    def shares(self, states: SenderStates) -> list[Delta]:
        """Each sender's gated delta, a row per query; `forward`'s delta is their exact sum."""
        cond, mask = self.condition(states)
        delta = self.generator.delta(cond, mask)
        if self.copy is not None:
            copied = self.copy(cond, mask, states.ids[0].to(mask.device), delta.scale)
            delta = LoRADelta({**delta.factors, self.copy.module: copied}, delta.scale)
        return self.fusion.shares(delta, states.num_senders)

    def condition(self, states: SenderStates) -> tuple[Tensor, Tensor]:
        """What the generator reads: cond [S * Q, T, width] sender-major (padding zero) and mask [S * Q, T];
        for a generator that `reads_layers`, cond [S * Q, patched layers, T, width] (`layer_states`).

        Raises:
            ModelLoadError: another number of senders, or a sender on a backbone of another shape
                than this hypernetwork was built for.
        """
        if states.num_senders != len(self.groups):
            raise ModelLoadError(f"this generator was built for {len(self.groups)} senders, got {states.num_senders}")
        device = self.fusion.gate_logits.device
        conds, masks = [], []
        for g, (hidden, mask) in enumerate(zip(states.hiddens, states.masks, strict=True)):
            mine = self._group_of(states, g, hidden)
            mask = mask.to(device)
            if self.generator.reads_layers:
                cond = layer_states(hidden.to(device), self.spec)
            elif isinstance(self.aggregation, LayerAggregation):
                cond = self.aggregation(hidden.to(device), mask)
            else:
                cond = self.aggregation[str(mine)](hidden.to(device), mask)
            if len(self.shapes) > 1 and str(mine) in self.projection:
                real = mask.view(mask.shape[0], *[1] * (cond.dim() - 3), mask.shape[1], 1)
                cond = self.projection[str(mine)](cond).masked_fill(~real, 0.0)
            conds.append(cond)
            masks.append(mask)
        if len(conds) == 1:
            return conds[0], masks[0]
        width = max(m.shape[1] for m in masks)
        blocks = [states.rows(s) for s in range(states.num_senders)]
        return (torch.cat([pad_right(conds[g][rows], width, -2) for g, rows in blocks]),
                torch.cat([pad_right(masks[g][rows], width, 1) for g, rows in blocks]))

    def _group_of(self, states: SenderStates, g: int, hidden: Tensor) -> int:
        """This hypernetwork's backbone group for the states' group `g`, its shape checked."""
        members = [s for s, group in enumerate(states.groups) if group == g]
        mine = self.groups[members[0]]
        shape = (hidden.shape[0], hidden.shape[-1])
        for s in members:
            if self.groups[s] != mine or self.shapes[self.groups[s]] != shape:
                want = self.shapes[self.groups[s]]
                raise ModelLoadError(f"sender {s} runs a backbone of {shape[0]} hidden-state layers and width "
                                     f"{shape[1]}; this generator was built for {want[0]} and {want[1]} there"
                                     + ("" if self.groups[s] == mine else f", on another backbone than sender {members[0]}"))
        return mine


def layer_states(hidden: Tensor, spec: ReceiverSpec) -> Tensor:
    """The sender states entering each patched receiver layer: hidden [layers + 1, N, T, H] ->
    [N, len(spec.layers), T, H]. Receiver layer i of L reads the sender's state entering its layer
    round(i * L_s / L) of L_s (layer i itself when the depths agree; index 0 is the embeddings)."""
    depth = hidden.shape[0] - 1
    index = torch.tensor([round(i * depth / spec.num_layers) for i in spec.layers], device=hidden.device)
    return hidden.index_select(0, index).transpose(0, 1)
