"""The demo's pretraining of a tiny backbone: its target loss is the model's own loss."""

import torch

from tflow.backbones.pretrain import target_loss
from tflow.training.data import teacher_forced


def test_target_loss_equals_the_models_own_loss(qwen, tok):
    ids, mask, labels = teacher_forced(tok, ["What is the secret code of Oslo?", "Hi"],
                                       ["The secret code of Oslo is 482.", "a helpful agent"], 64)
    expected = qwen(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(target_loss(qwen, ids, mask, labels), expected)

