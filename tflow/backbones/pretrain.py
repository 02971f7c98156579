"""A short supervised fine-tune of a whole backbone on (prompt, target) pairs.

The demo uses it to teach a freshly built tiny model a format before it is frozen; generator
training itself runs on Lightning (tflow.training.loop).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tflow.training.data import teacher_forced


def pretrain(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int,
             batch_size: int = 32, lr: float = 5e-3, seed: int = 0, max_length: int = 256,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train every weight of `model` on teacher-forced pairs (loss on targets only); returns losses.

    AdamW with a one-cycle schedule; pairs are shuffled with `seed` and cycled. The model is left
    in eval mode with gradients off.
    """
    order = list(pairs)
    random.Random(seed).shuffle(order)
    torch.manual_seed(seed)
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(steps):
        start = (step * batch_size) % len(order)
        batch = order[start : start + batch_size] or order[:batch_size]
        ids, mask, labels = teacher_forced(tokenizer, [p for p, _ in batch], [t for _, t in batch], max_length)
        loss = target_loss(model, ids, mask, labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.requires_grad_(False).eval()
    return losses


def target_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, as `model(labels=...).loss`.

    The output head runs on those positions only: targets are a small part of each sequence, and
    logits over the whole vocabulary at every position cost about as much as the backbone.
    ids, mask, labels: [batch, seq].
    """
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    following = labels[:, 1:]
    keep = following != -100
    return nn.functional.cross_entropy(model.get_output_embeddings()(hidden[keep]), following[keep])

