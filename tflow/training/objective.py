"""The answer objective every channel's training shares (`train.objective`): cross-entropy on the
answer tokens, distillation from the teacher's top-k distribution over them, or both.

Every channel computes its receiver's logits over prompt + answer with labels that are -100 off the
answer, and hands them here; position t predicts the label at t + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tflow.errors import RecipeError
from tflow.tasks import Example


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy where labels are not -100. logits [N, W, V], labels [N, W]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def distill_loss(logits: Tensor, labels: Tensor, teacher: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """KL(teacher || student) at each answer token over the teacher's top-k tokens and one bucket
    for the rest of the vocabulary, averaged over each row's answer tokens, then over rows.

    It is 0, with zero gradient, where the student's distribution equals the teacher's; its
    gradient on the top-k logits is the cross-entropy's, `q - p`, and the bucket keeps the student
    from putting mass where the teacher put none.

    logits [N, W, V], labels [N, W] (-100 off the answer); teacher[i]: (log-probs [n_i, k], ids
    [n_i, k]) at row i's answer tokens in order, n_i at least the row's answer tokens (a row cut
    to train.max_length reads the first).

    Raises:
        ValueError: a row with more answer tokens than its teacher scored.
    """
    losses = []
    for i, (values, ids) in enumerate(teacher):
        at = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        if len(at) > len(values):
            raise ValueError(f"row {i} has {len(at)} answer tokens, its teacher scored {len(values)}")
        student = logits[i, at].float().log_softmax(-1).gather(-1, ids[: len(at)].long())  # [m, k]
        logp = values[: len(at)].float()
        p = logp.exp()
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        # log(1 - sum_k q_k), kept finite where the student puts (almost) all its mass on the top k
        q_rest = torch.log((-torch.expm1(student.logsumexp(-1).clamp(max=0))).clamp(min=1e-12))
        kl = (p * (logp - student)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest
        losses.append(kl.mean())
    return torch.stack(losses).mean()


class Objective:
    """`train.objective` for one run: `parts(logits, labels, examples)` gives the loss and its terms.

    Raises:
        RecipeError: a distillation objective without the teacher's targets.
    """

    def __init__(self, train, teacher=None):
        self.kind, self.weight, self.teacher = train.objective, train.distill_weight, teacher
        if self.kind != "ce" and teacher is None:
            raise RecipeError([f"train.objective: {self.kind} needs the teacher's targets "
                               "(tflow.training.teacher.prepare), which this run was not given"])

    def parts(self, logits: Tensor, labels: Tensor, examples: Sequence[Example]) -> dict[str, Tensor]:
        """{"loss": what is trained on, and with a teacher "ce" and "distill", its terms}. `ce` is
        always reported beside a distillation (under no_grad where it is not trained on), so runs
        of every objective compare on it."""
        if self.kind == "ce":
            return {"loss": answer_loss(logits, labels)}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kind == "ce+distill"):
            ce = answer_loss(logits, labels)
        distill = distill_loss(logits, labels, self.teacher.lookup(examples, logits.device))
        loss = distill if self.kind == "distill" else ce + self.weight * distill
        return {"loss": loss, "ce": ce, "distill": distill}
