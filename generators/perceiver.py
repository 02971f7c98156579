"""The perceiver generator (Doc-to-LoRA's): layer i's LoRA is read from the sender states entering layer i.

One Perceiver with shared weights runs over each patched layer's sender states (the layer axis
folded into the batch): `rank` learned latents, plus a learned embedding of the layer, read the
states by cross-attention in `depth` blocks. Each latent becomes one rank of every targeted module
of that layer through a per-layer linear head to an A row and a B row. With `state_values`, a
rank's B column is instead a mix of the sender's own states that its latent points at: the
receiver and the sender share one residual space, so B can write a sender's state as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from pydantic import model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn
from torch.nn.functional import normalize

from generators.base import Factors, Generator, SlotHead
from generators.registry import register
from generators.settings import GeneratorSettings
from tflow.backbones.families import ReceiverSpec
from tflow.errors import TargetError


class PerceiverSettings(GeneratorSettings):
    """The perceiver's own knobs beside the shared ones (`depth`: cross-attention blocks)."""

    normalize_rank: bool = True
    """L2-normalise each rank's latent before the head, so a rank's direction, not its length,
    picks its A and B rows (Doc-to-LoRA's); false: a LayerNorm instead."""
    rank_scalars: bool = True
    """Learned per-layer, per-rank scalars on A (start 1) and B (start 0), Doc-to-LoRA's zero
    start; each B scalar sets its rank's size. False: no scalars, and the B head starts at zero
    instead. Either way a fresh generator's delta is exactly zero."""
    bias_delta: bool = True
    """Append a learned, query-independent LoRA of `rank` more ranks per module (B starts at
    zero), so what every query needs alike (the answer's form) has a place of its own and the
    generated ranks are left to carry the query."""
    state_values: bool = False
    """Each rank's B column is the sender's states entering that layer (each L2-normalised), mixed
    by an attention of the rank's latent over the positions, times its B scalar: a pointer into
    the sender's residual stream, as the copy head is one into its tokens. Needs rank_scalars and
    targets that write the residual stream (out_features = hidden size: down_proj, o_proj)."""

    @model_validator(mode="after")
    def _state_values_need_rank_scalars(self):
        if self.state_values and not self.rank_scalars:
            raise PydanticCustomError("key_problem", "{message}", {
                "key": "state_values", "message": "needs rank_scalars: true (its zero-start B scalars size the states)"})
        return self


class LatentBlock(nn.Module):
    """Pre-LayerNorm residual block: the latents read the states and each other; then an MLP."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.norm_latents, self.norm_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor, memory: Tensor, pad: Tensor) -> Tensor:
        """x: [B, r, d] latents, memory: [B, T, d], pad: [B, T] (True = padding) -> [B, r, d]."""
        q = self.norm_latents(x)
        keys = torch.cat([memory, q], dim=1)
        pad = torch.cat([pad, pad.new_zeros(pad.shape[0], q.shape[1])], dim=1)
        x = x + self.attention(q, keys, keys, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class RankHead(SlotHead):
    """Per (layer, module kind): a bias-free linear head from each rank's latent to its A row and B
    row, optional per-rank scalars, and an optional query-independent bias LoRA appended as ranks.

    A rows start like a LoRA A (entries of std ~1/sqrt(in)); B columns have norm ~1 before their
    scalar (which starts at 0), or start at zero without scalars: a fresh head is an exact no-op.
    """

    def __init__(self, spec: ReceiverSpec, d_model: int, rank: int, head_scale: float, settings: Mapping[str, Any]):
        super().__init__(spec)
        self.rank, self.head_scale = rank, head_scale
        self.normalize_rank, self.state_values = settings["normalize_rank"], settings["state_values"]
        unit = 1.0 if self.normalize_rank else float(d_model)  # the squared length of a latent the head reads
        self.weight, self.scale_a, self.scale_b = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.bias_a, self.bias_b = nn.ParameterDict(), nn.ParameterDict()
        for kind, (i, o) in self.shapes.items():
            layers = len(self.slot_layers[kind])
            a = torch.randn(layers, d_model, i) / math.sqrt(unit * i)
            b = torch.randn(layers, d_model, o) / math.sqrt(unit * o) if settings["rank_scalars"] \
                else torch.zeros(layers, d_model, o)
            self.weight[kind] = nn.Parameter(a if self.state_values else torch.cat([a, b], dim=-1))
            if settings["rank_scalars"]:
                self.scale_a[kind] = nn.Parameter(torch.ones(layers, rank))
                self.scale_b[kind] = nn.Parameter(torch.zeros(layers, rank))
            if settings["bias_delta"]:
                self.bias_a[kind] = nn.Parameter(torch.randn(layers, rank, i) / math.sqrt(i))
                self.bias_b[kind] = nn.Parameter(torch.zeros(layers, o, rank))

    def emit(self, kind: str, tokens: Tensor) -> Sequence[tuple[Tensor, Tensor]]:
        """tokens: [N, l, r, d_model] (with `state_values`, [N, l, r, d_model + out]: each latent, then
        the states it points at) -> l pairs (A [N, r', in], B [N, out, r']), r' = r (+ r with a bias LoRA)."""
        n = tokens.shape[0]
        i, o = self.shapes[kind]
        if self.state_values:
            tokens, b = tokens.split([tokens.shape[-1] - o, o], dim=-1)
            b = rearrange(b, "n l r o -> l n r o")
        latents = normalize(tokens, dim=-1) if self.normalize_rank else tokens
        a = torch.einsum("nlrd,ldf->lnrf", latents, self.weight[kind])  # A rows (and B rows without state_values)
        if not self.state_values:
            a, b = a.split([i, o], dim=-1)
        if kind in self.scale_a:
            a = a * self.scale_a[kind][:, None, :, None]
            b = b * self.scale_b[kind][:, None, :, None]
        b = rearrange(b * self.head_scale, "l n r o -> l n o r")
        if kind in self.bias_a:
            a = torch.cat([a, self.bias_a[kind][:, None].expand(-1, n, -1, -1)], dim=2)
            b = torch.cat([b, self.bias_b[kind][:, None].expand(-1, n, -1, -1)], dim=3)
        return list(zip(a.unbind(0), b.unbind(0), strict=True))


@register("perceiver")
class PerceiverGenerator(Generator):
    """Shared Perceiver over each patched layer's sender states -> one token per rank -> per-layer heads.

    Reads `cond: [N, layers, T, H]`, the states entering each patched layer of the receiver
    (`reads_layers`), and emits factors for every targeted module; `rank` is also the number of
    latents. Default targets: `down_proj` (Doc-to-LoRA's).
    """

    Settings = PerceiverSettings
    reads_layers = True
    copy_head = False  # it reads per-layer states, not the aggregated condition the copy head keys on
    default_targets = ("down_proj",)
    default_head_scale = 1.0  # the per-rank B scalars set B's size (see RankHead)

    def __init__(self, spec: ReceiverSpec, config: Mapping[str, Any], sender_hidden_size: int):
        super().__init__(spec, config, sender_hidden_size)
        d, cfg = self.config["d_model"], self.config
        self.in_norm = nn.LayerNorm(sender_hidden_size)
        self.in_proj = nn.Linear(sender_hidden_size, d)
        self.latents = nn.Parameter(torch.randn(self.rank, d) * 0.02)
        self.layer_emb = nn.Parameter(torch.randn(len(spec.layers), 1, d) * 0.02)
        self.blocks = nn.ModuleList(LatentBlock(d, cfg["heads"], cfg["dropout"]) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(d)
        if cfg["state_values"]:
            wrong = sorted({m.kind for m in spec.modules if m.out_features != sender_hidden_size})
            if wrong:
                raise TargetError(f"generator.state_values writes the senders' states (width {sender_hidden_size}) "
                                  f"into B, but {', '.join(wrong)} do not write the residual stream; use "
                                  "generator.targets: [down_proj] or [o_proj]")
            self.point_query, self.point_key = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def head(self, spec: ReceiverSpec) -> RankHead:
        return RankHead(spec, self.config["d_model"], self.rank, self.config["head_scale"], self.config)

    def forward(self, cond: Tensor, mask: Tensor) -> Factors:
        """cond: [N, layers, T, H] (one entry per patched layer, in `spec.layers` order), mask: [N, T]
        (True = real) -> {name: (A [N, r', in], B [N, out, r'])}."""
        n, layers = cond.shape[:2]
        mask = mask.bool()
        # Zeroing padding first keeps even inf/nan garbage out of the (masked) attention values.
        cond = torch.where(mask[:, None, :, None], cond.to(self.latents.dtype), 0.0)
        memory = self.in_proj(self.in_norm(rearrange(cond, "n l t h -> (n l) t h")))
        pad = (~mask).repeat_interleave(layers, dim=0)
        x = (self.latents + self.layer_emb).repeat(n, 1, 1)
        for block in self.blocks:
            x = block(x, memory, pad)
        tokens = self.norm(x)
        if self.config["state_values"]:
            tokens = torch.cat([tokens, self.pointed_states(tokens, memory, pad, cond.flatten(0, 1))], dim=-1)
        tokens = rearrange(tokens, "(n l) r d -> n l r d", n=n)
        kinds = len(self.detokenizer.kinds)
        return self.detokenizer(tokens[:, :, None].expand(-1, -1, kinds, -1, -1))

    def pointed_states(self, tokens: Tensor, memory: Tensor, pad: Tensor, states: Tensor) -> Tensor:
        """Each latent's attention mix of the raw states, each state L2-normalised: tokens [B, r, d],
        memory [B, T, d], pad [B, T] (True = padding), states [B, T, H] -> [B, r, H] (zero for a
        row without a real position)."""
        scores = torch.einsum("brd,btd->brt", self.point_query(tokens), self.point_key(memory))
        scores = scores.masked_fill(pad[:, None, :], torch.finfo(scores.dtype).min) / math.sqrt(tokens.shape[-1])
        weights = torch.softmax(scores, dim=-1).masked_fill(pad[:, None, :], 0.0)
        return torch.einsum("brt,bth->brh", weights, normalize(states, dim=-1))
