"""Evaluation sharded over processes and nodes on Lightning, with the engine and flags training uses.

A Lightning Trainer runs `test` over the indices of the evaluated examples; Lightning's
DistributedSampler gives each process its share, padded by repeating examples so that every
process runs as many batches (Lightning's unpadded sampler for `predict` refuses a process with no
example, as when there are fewer examples than processes). Every process answers its indices on
every channel and keeps the replies, its calls' stage seconds and the queries that raised. Global
rank 0 gathers the shards (`torch.distributed.gather_object`, which gloo runs on CPU), puts the
replies back in example order, each example once, and scores them as `tflow.evaluation.evaluate` does, so
accuracy, tokens and predictions equal a one-process run's. The other processes return None and
write nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from tflow.errors import DeviceError, TflowError, first_line
from tflow.evaluation.evaluate import (
    ChannelResult,
    EvalResult,
    Failure,
    add_checks,
    check_inputs,
    progress_bar,
)
from tflow.reply import Reply
from tflow.tasks import Example, Task
from tflow.team import Team
from tflow.training.loop import quiet_lightning

SHARDING = ("ddp", "auto")
"""Strategies eval shards with: processes started as scripts (ddp), or Lightning's choice (auto)."""

log = logging.getLogger(__name__)


def eval_trainer(strategy: str = "ddp", devices: int | str = 1, num_nodes: int = 1, accelerator: str = "auto",
                 progress: bool = True) -> L.Trainer:
    """The Lightning Trainer that shards an evaluation; made (and checked) before any model loads.

    `devices` are processes per node: a positive count or `auto`. On CPU each is a process, at
    most one per core.

    Raises:
        DeviceError: an unknown strategy (the known ones are listed), one eval does not shard with,
            num_nodes < 1, a bad device count, more devices than this machine has (what it has is
            said), or any other setting Lightning refuses (its message, on one line), or a command
            Lightning cannot rerun for the other processes (`python -c`).
    """
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if strategy not in known:
        raise DeviceError(f"unknown strategy {strategy!r}; Lightning knows: {', '.join(known)}")
    if strategy not in SHARDING:
        raise DeviceError(f"eval shards its queries with strategy {' or '.join(SHARDING)}, not {strategy!r}")
    if type(num_nodes) is not int or num_nodes < 1:
        raise DeviceError(f"--num-nodes must be an integer >= 1, got {num_nodes!r}")
    devices = _device_count(devices)
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = lightning_info.level
    lightning_info.setLevel(logging.WARNING)  # its GPU/TPU lines would come before a one-line error
    try:
        trainer = L.Trainer(strategy=strategy, devices=devices, num_nodes=num_nodes, accelerator=accelerator,
                            logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=progress, inference_mode=False)
    except Exception as err:  # Lightning refuses settings with several types (Misconfiguration, Value, Import...)
        raise DeviceError(f"cannot run on devices={devices}, num_nodes={num_nodes}, accelerator={accelerator!r}: "
                          f"{one_line(err)}") from None
    finally:
        lightning_info.setLevel(level)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise DeviceError(f"--devices {trainer.num_devices} on cpu: this machine has {cores} CPU core"
                          f"{'s' * (cores != 1)}; ask for at most {cores} (one process per core)")
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_devices > 1 and environment is not None and not environment.creates_processes_externally:
        _check_rerunnable()
    return trainer


def device_override(trainer: L.Trainer) -> str:
    """The recipe override that loads this process's backbone onto its own device (else every
    process of a node would first load onto cuda:0)."""
    device = trainer.strategy.root_device
    return f"model.device={device if device.type == 'cuda' else device.type}"


def _device_count(devices: int | str) -> int | str:
    if devices == "auto" or (type(devices) is int and devices > 0):
        return devices
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    raise DeviceError(f"--devices must be a positive integer or auto, got {devices!r}")


def _check_rerunnable() -> None:
    """Lightning starts the other processes of a node by rerunning this command (`sys.argv`)."""
    import __main__

    if __main__.__spec__ is None and not Path(sys.argv[0]).is_file():
        raise DeviceError("more than one device starts each process by rerunning this command, which "
                          f"{sys.argv[0]!r} cannot be; run `tflow eval ...` or `python -m tflow.cli eval ...`")


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a report or an error that must stay on one line."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__


@dataclass
class Shard:
    """What one process answered: per channel, its batched calls (example indices, replies), the
    queries that raised, and its wall seconds."""

    rank: int
    calls: dict[str, list[tuple[list[int], list[Reply]]]] = field(default_factory=dict)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class ShardModule(L.LightningModule):
    """Answers each batch of example indices on every channel; rank 0 ends up with every shard."""

    def __init__(self, team: Team, task: Task, examples: Sequence[Example], channels: Sequence[str]):
        super().__init__()
        self._team = (team,)  # a tuple keeps the backbones out of this module (nothing here is trained)
        self.task, self.examples, self.channels = task, examples, list(channels)
        self.shards: list[Shard] = []

    @property
    def team(self) -> Team:
        return self._team[0]

    def on_test_start(self) -> None:
        receiver = self.team.receiver
        parts = [a.model for a in [*self.team.senders, receiver]] + [receiver.generator, receiver.kv_lora, receiver.links]
        for part in {id(p): p for p in parts if p is not None}.values():
            part.to(self.device)
        self.shard = Shard(self.global_rank, {c: [] for c in self.channels}, {c: [] for c in self.channels},
                           dict.fromkeys(self.channels, 0.0))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # example indices; the team makes its tensors on its device

    def test_step(self, indices: list[int], batch_idx: int) -> None:
        for channel in self.channels:
            began = time.perf_counter()
            self._answer(channel, indices)
            self.shard.seconds[channel] += time.perf_counter() - began

    def _answer(self, channel: str, indices: list[int]) -> None:
        """One batched call; when it raises, each query alone, so only the queries that fail are lost."""
        batch = [self.examples[i] for i in indices]
        try:
            replies = self.team.communicate([self.task.prompt(ex) for ex in batch], channel=channel,
                                            contexts=[ex.contexts for ex in batch])
        except Exception as err:
            if len(indices) > 1:
                for i in indices:
                    self._answer(channel, [i])
                return
            (index,), (example,) = indices, batch
            log.warning("rank %d: %s query %d failed: %s", self.global_rank, channel, index, one_line(err),
                        exc_info=not isinstance(err, TflowError))  # a bug's traceback, a user mistake's line
            self.shard.failures[channel].append(Failure(index, example.question, self.global_rank, one_line(err)))
            return
        self.shard.calls[channel].append((list(indices), replies))

    def on_test_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shards = [None] * torch.distributed.get_world_size() if self.global_rank == 0 else None
            torch.distributed.gather_object(self.shard, shards, dst=0)
            self.shards = shards or []
        else:
            self.shards = [self.shard]


def evaluate_sharded(trainer: L.Trainer, team: Team, task: Task, examples: Sequence[Example],
                     channels: str | Sequence[str], *, batch_size: int = 8,
                     ablations: str | Sequence[str] | None = None) -> EvalResult | None:
    """`tflow.evaluation.evaluate.evaluate` with the channel runs sharded over `trainer`'s processes (`eval_trainer`).

    Returns the result on global rank 0 and None on every other process. A query that raises is
    kept in its channel's `failures` (example index, rank, one-line message) and counted as wrong;
    the others still answer. The diagnostics and ablations run on rank 0 alone, after the channels.

    Raises:
        The errors of `evaluate`, checked before anything runs.
    """
    names, chosen = check_inputs(team, examples, channels, batch_size, ablations)
    module = ShardModule(team, task, examples, names)
    loader = DataLoader(range(len(examples)), batch_size=batch_size, collate_fn=list)
    with warnings.catch_warnings(), quiet_lightning():  # and its start-up banners ("Initializing distributed")
        # Lightning warns that the sampler repeats examples: merge drops the repeats
        warnings.filterwarnings("ignore", "Using `DistributedSampler` with the dataloaders")
        trainer.test(module, loader, verbose=False)
    if not trainer.is_global_zero:
        return None
    result = EvalResult(task.name, len(examples), merge(module.shards, team, task, examples, names),
                        processes=trainer.world_size)
    with progress_bar(trainer.progress_bar_callback is not None and bool(chosen)) as bar:
        add_checks(result, team, task, examples, chosen, batch_size, bar)
    return result


def merge(shards: Sequence[Shard], team: Team, task: Task, examples: Sequence[Example],
          channels: Sequence[str]) -> dict[str, ChannelResult]:
    """Each channel's result over every shard: every call's costs once, each example's reply (or
    else its failure) once, in example order; a padding repeat that failed where another answered is dropped."""
    results = {}
    for channel in channels:
        result = results[channel] = ChannelResult(channel, team.label(channel))
        replies: dict[int, Reply] = {}
        for shard in shards:
            for indices, batch in shard.calls[channel]:
                result.add_call(batch[0])
                for index, reply in zip(indices, batch, strict=True):
                    replies.setdefault(index, reply)
        for index in sorted(replies):
            result.add_reply(index, examples[index], replies[index], task, team.receiver.name)
        failed: dict[int, Failure] = {}
        for shard in shards:
            for failure in shard.failures[channel]:
                if failure.index not in replies:
                    failed.setdefault(failure.index, failure)
        result.failures = [failed[index] for index in sorted(failed)]
        result.wall_seconds = max(shard.seconds[channel] for shard in shards)
    return results
