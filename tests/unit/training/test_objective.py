"""The answer objective: cross-entropy as the model computes it, distillation as computed by hand."""

import math

import pytest
import torch

from tflow.config.recipe import load_recipe
from tflow.errors import RecipeError
from tflow.training.objective import Objective, answer_loss, distill_loss


def test_answer_loss_equals_the_models_own_loss(qwen):
    ids = torch.tensor([[5, 17, 33, 2, 81, 9], [7, 8, 9, 10, 0, 0]])
    labels = torch.tensor([[-100, -100, 33, 2, 81, 9], [-100, -100, -100, 10, -100, -100]])
    with torch.no_grad():
        out = qwen(input_ids=ids, labels=labels)
    torch.testing.assert_close(answer_loss(out.logits, labels), out.loss)


def kl_by_hand(logits_row, teacher_logp, teacher_ids):
    """KL over the teacher's top-k tokens and one bucket for the rest, in plain Python floats."""
    q = [math.exp(x) for x in logits_row]
    q = [x / sum(q) for x in q]
    p = [math.exp(v) for v in teacher_logp]
    top = sum(pk * (math.log(pk) - math.log(q[i])) for pk, i in zip(p, teacher_ids, strict=True))
    p_rest, q_rest = 1 - sum(p), 1 - sum(q[i] for i in teacher_ids)
    return top + p_rest * (math.log(p_rest) - math.log(q_rest))


def test_distill_loss_equals_a_hand_computation():
    logits = torch.tensor([[[0.1, 0.5, -0.3, 1.2], [1.0, -1.0, 0.2, 0.0], [0.3, 0.3, 2.0, -0.5], [0.0] * 4],
                           [[0.0] * 4, [0.0] * 4, [2.0, 0.1, -1.0, 0.4], [0.0] * 4]])
    labels = torch.tensor([[-100, -100, 2, 3], [-100, -100, -100, 1]])
    teacher = [(torch.tensor([[-0.2, -2.5], [-0.9, -1.1]]), torch.tensor([[3, 0], [2, 1]])),
               # row 1 was cut to one answer token: its teacher scored two, the first is read
               (torch.tensor([[-0.5, -1.5], [-0.1, -3.0]]), torch.tensor([[1, 3], [0, 2]]))]
    row0 = (kl_by_hand(logits[0, 1].tolist(), [-0.2, -2.5], [3, 0])
            + kl_by_hand(logits[0, 2].tolist(), [-0.9, -1.1], [2, 1])) / 2  # averaged per example ...
    row1 = kl_by_hand(logits[1, 2].tolist(), [-0.5, -1.5], [1, 3])
    assert distill_loss(logits, labels, teacher).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)  # ... then over rows


def test_distill_loss_is_zero_with_zero_gradient_where_the_student_is_the_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g).requires_grad_()
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = 4
    labels[1, 2:5] = 7
    teacher = []
    for i in range(2):
        at = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        teacher.append(logits[i, at].detach().log_softmax(-1).topk(4, dim=-1))
    loss = distill_loss(logits, labels, teacher)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logits.grad.abs().max().item() < 1e-6
    with torch.no_grad():  # and it grows as the student moves away
        assert distill_loss(logits * 1.5, labels, teacher).item() > 1e-3


def test_a_distillation_objective_without_teacher_targets_is_refused():
    recipe = load_recipe("recipes/tiny.yaml", ["train.objective=ce+distill"])
    with pytest.raises(RecipeError, match=r"train.objective: ce\+distill needs the teacher's targets"):
        Objective(recipe.train)
