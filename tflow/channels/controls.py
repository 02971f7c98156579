"""The trained controls: `none`, `text` and `context` with a receiver LoRA of their own.

A trained channel is compared with the receiver trained the same way without its message: a LoRA
of the kv channel's size (`tflow.channels.receiver_part`), trained on the same data and answer
target, reading no message (`none trained`), the senders' text messages (`text trained`) or the
senders' documents in its own prompt (`context trained`). Untrained (no checkpoint part, or a zero
one), each is the plain channel.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from tflow.channels.receiver_part import receiver_lora_part
from tflow.channels.registry import TrainedPart

Turns = Callable[[object, list[str], list[dict[str, str]]], list[str]]
"""(team, queries, per-query {sender: document}) -> the user turns the receiver reads."""


def control_part(channel: str, turns: Turns) -> TrainedPart:
    """The receiver LoRA part of a control channel, trained on the receiver turns `turns` gives."""

    def module():
        from tflow.channels.control_training import control_module

        return control_module(channel, turns)

    return receiver_lora_part(channel, module, trained_label=f"{channel} trained", compare_untrained=True, turns=turns)


@contextmanager
def trained_receiver(receiver, channel: str):
    """Patch the receiver's trained LoRA of `channel` in, when it holds one (else change nothing)."""
    from tflow.lora.patching import patched

    lora = receiver.parts.get(channel)
    if lora is None or lora.is_zero():
        yield
        return
    with patched(receiver.model, lora.delta()):
        yield
