"""The latent channel's trainable parts (RecursiveMAS): InnerLinks and OuterLinks.

InnerLink (d -> d): y = LN(x + W2 GELU(W1 LN(x))), a sender's last-layer state -> its next input
embedding (a latent thought). OuterLink (d_src -> d_tgt): y = LN(W2 GELU(W1 LN(x)) + W_r x), one
agent's thoughts -> another agent's input-embedding space. The LLMs stay frozen.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InnerLink(nn.Module):
    """x [..., d] -> [..., d]."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.norm_in, self.up, self.down, self.norm_out = nn.LayerNorm(dim), nn.Linear(dim, hidden), \
            nn.Linear(hidden, dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(self.up.weight.dtype)  # the link keeps its own dtype (float32) beside a bf16 backbone
        return self.norm_out(h + self.down(F.gelu(self.up(self.norm_in(h))))).to(x.dtype)


class OuterLink(nn.Module):
    """x [..., d_src] -> [..., d_tgt].

    Between spaces of one width it starts as the identity up to the output norm (W_r = I, the
    MLP's down projection zero): agents on one backbone share one embedding space, so a thought
    starts out as what it is for its sender, and training moves it from there.
    """

    def __init__(self, d_src: int, d_tgt: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_src
        self.norm_in, self.up, self.down = nn.LayerNorm(d_src), nn.Linear(d_src, hidden), nn.Linear(hidden, d_tgt)
        self.residual, self.norm_out = nn.Linear(d_src, d_tgt, bias=False), nn.LayerNorm(d_tgt)
        if d_src == d_tgt:
            with torch.no_grad():
                self.residual.weight.copy_(torch.eye(d_src, device=self.residual.weight.device))
                self.down.weight.zero_()
                self.down.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(self.up.weight.dtype)  # the link keeps its own dtype (float32) beside a bf16 backbone
        return self.norm_out(self.down(F.gelu(self.up(self.norm_in(h)))) + self.residual(h)).to(x.dtype)


class Links(nn.Module):
    """Every link of one team: an InnerLink per sender and one for the receiver, an OuterLink per
    sender into the receiver, and the feedback OuterLink from the receiver to the first sender."""

    def __init__(self, sender_dims: Sequence[int], receiver_dim: int, hidden: int | None = None):
        super().__init__()
        self.sender_dims, self.receiver_dim, self.hidden = list(sender_dims), receiver_dim, hidden
        self.inner = nn.ModuleList([InnerLink(d, hidden) for d in sender_dims])
        self.receiver_inner = InnerLink(receiver_dim, hidden)
        self.outer = nn.ModuleList([OuterLink(d, receiver_dim, hidden) for d in sender_dims])
        self.feedback = OuterLink(receiver_dim, sender_dims[0], hidden)

    @torch.no_grad()
    def match_embeddings(self, senders: Sequence[nn.Module], receiver: nn.Module) -> Links:
        """Start every link's output at the scale of the input embeddings it stands in for.

        A LayerNorm output has RMS 1 per element, where token embeddings have far less (0.02-0.05
        in real models); a thought that loud drowns the prompt around it, and Adam needs about
        1 / lr steps to shrink the norm's weight. So each output norm's weight starts at the RMS of
        the target model's embedding table: the sender's for its InnerLink, the receiver's for the
        OuterLinks and its own InnerLink, the first sender's for the feedback link.
        """
        scale = [_embedding_rms(m) for m in senders]
        target = _embedding_rms(receiver)
        for s, link in enumerate(self.inner):
            link.norm_out.weight.fill_(scale[s])
        for link in (*self.outer, self.receiver_inner):
            link.norm_out.weight.fill_(target)
        self.feedback.norm_out.weight.fill_(scale[0])
        return self

    @property
    def config(self) -> dict:
        """What a checkpoint of it must match."""
        return {"sender_dims": self.sender_dims, "receiver_dim": self.receiver_dim, "hidden": self.hidden}


def inner_loss(link: InnerLink, hidden: Tensor, next_embeds: Tensor, mask: Tensor) -> Tensor:
    """RecursiveMAS's InnerLink objective on text: (1 - cos) + 0.1 MSE between link(h_t) and the
    input embedding of token t + 1, averaged over real positions.

    hidden, next_embeds: [N, T, d]; mask: [N, T] bool, True where both are real.
    """
    y = link(hidden)[mask]
    target = next_embeds[mask]
    return (1 - F.cosine_similarity(y, target, dim=-1)).mean() + 0.1 * F.mse_loss(y, target)


def accepts_embeddings(model: nn.Module) -> bool:
    """Whether `model` gives its input embeddings and takes `inputs_embeds`, as latent thoughts need."""
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return isinstance(table, nn.Embedding) and "inputs_embeds" in inspect.signature(model.forward).parameters


def embed(model: nn.Module, ids: Sequence[int]) -> Tensor:
    """The input embeddings [len(ids), H] of token ids."""
    table = model.get_input_embeddings()
    return table(torch.tensor(list(ids), dtype=torch.long, device=table.weight.device))


def _embedding_rms(model: nn.Module) -> float:
    """The root mean square of one entry of `model`'s input-embedding table."""
    return model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()
