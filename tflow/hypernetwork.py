"""Hypernetwork: sender states -> one fused per-query delta (aggregation, generator, fusion)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

import generators
from tflow.conditioning import LayerAggregation
from tflow.encoding import SenderStates
from tflow.fusion import Delta, Fusion, fuse
from tflow.spec import ReceiverSpec


class Hypernetwork(nn.Module):
    """The trainable part of the weight channel; everything a generator checkpoint holds.

    `config` records what is needed to rebuild it: the generator config, the number of senders,
    the sender layer count and hidden size, and the fusion gate's initial value.
    `max_delta_norm` is a run-time bound, not part of the checkpoint: the weights channel applies
    no query's delta whose `LoRADelta.row_norms()` exceeds it (None: no bound).
    """

    def __init__(self, spec: ReceiverSpec, generator: Mapping, num_senders: int, sender_layers: int,
                 sender_hidden: int, gate_init: float = 1.0, max_delta_norm: float | None = None):
        super().__init__()
        self.spec = spec
        self.max_delta_norm = max_delta_norm
        self.aggregation = LayerAggregation(sender_layers)
        self.generator = generators.build(dict(generator), spec, sender_hidden)
        self.fusion = Fusion(num_senders, gate_init)
        self.config = {
            "generator": self.generator.config,
            "num_senders": num_senders,
            "sender_layers": sender_layers,
            "sender_hidden": sender_hidden,
            "gate_init": gate_init,
        }

    def forward(self, states: SenderStates) -> Delta:
        """One delta with a row per query: the senders' shares fused."""
        return fuse(self.shares(states))

    def shares(self, states: SenderStates) -> list[Delta]:
        """Each sender's gated delta, a row per query; `forward`'s delta is their exact sum."""
        device = self.fusion.gate_logits.device
        mask = states.mask.to(device)
        cond = self.aggregation(states.hidden.to(device), mask)
        return self.fusion.shares(self.generator.delta(cond, mask), states.num_senders)
