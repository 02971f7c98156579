"""Copy head: a delta on the receiver's output layer that lets it say the senders' own tokens.

A generator's LoRA factors carry a sender's tokens only through its trunk, and on a real model
that route does not learn to pass on an exact value (docs/results.md). The copy head gives each
sender token t one rank of a delta on the receiver's LM head, an induction read keyed by what
preceded the token:

    A_t = W rmsnorm(c_{t-1})        c: the conditioning, the sender's aggregated states
    B_t = gain · e_{id_t}           a one-hot column over the receiver's vocabulary, held as
                                    the id and its value (`OneHotColumns`)

so at receiver position j the logits gain `gain · sum_t (x_j · A_t) e_{id_t}`: token t is voted
for as far as the receiver's state x_j matches the sender's state just before it. It is an
ordinary per-row LoRA delta (rank = the sender's length), so fusion, patching, the norm guard and
export treat it like any other module's. W starts at zero, so a fresh head is an exact no-op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tflow.errors import RecipeError
from tflow.lora.onehot import OneHotColumns


class CopyHead(nn.Module):
    """Keys from sender states, one-hot values from sender tokens, for the receiver's LM head `module`.

    width: the conditioning's width; hidden, vocab: the LM head's in and out features.
    """

    def __init__(self, module: str, width: int, hidden: int, vocab: int):
        super().__init__()
        self.module, self.vocab = module, vocab
        self.key = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.key.weight)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, cond: Tensor, mask: Tensor, ids: Tensor, scale: float) -> tuple[Tensor, OneHotColumns]:
        """cond: [N, T, width], mask: [N, T] bool, ids: [N, T] -> A [N, T-1, hidden], B [N, vocab, T-1].

        B is one-hot (`OneHotColumns`: the ids and their values, never vocab-wide floats) and
        divided by `scale`, the delta's own, so the update is exactly gain · B A.
        """
        real = mask[:, 1:].to(cond.dtype)  # a rank exists only where t-1 and t are both real tokens
        before = cond[:, :-1]
        keys = self.key(before * torch.rsqrt(before.pow(2).mean(-1, keepdim=True) + 1e-6)) * real[..., None]
        return keys, OneHotColumns(ids[:, 1:].clamp(min=0), real * (self.gain / scale), self.vocab)


def lm_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of `model`'s output layer, the copy head's target.

    Raises:
        RecipeError: the model has no nn.Linear output layer.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head and isinstance(module, nn.Linear):
            return name, module
    raise RecipeError([f"generator.copy_head: the receiver ({type(model).__name__}) has no nn.Linear output "
                       "layer to copy into; set generator.copy_head: false"])
