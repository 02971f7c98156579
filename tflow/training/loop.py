"""`tflow train`: one channel's trained part on Lightning, the backbones frozen.

The channel's record (`tflow.channels.registry`) gives the Lightning module that trains its part
and how the part is saved; this loop holds the run folder, loads the data and the team, and runs
Lightning with atomic checkpoints, resumable runs and metrics.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch.utils.data import DataLoader

from tflow.backbones.devices import agents_device, check_dtype
from tflow.channels import registry
from tflow.errors import CheckpointError, DeviceError, first_line
from tflow.io import atomic_write, atomic_write_text, exclusive, writable_dir
from tflow.team import Team, load
from tflow.training import teacher
from tflow.training.data import load_splits
from tflow.training.val_accuracy import ValAccuracy

LIGHTNING_DIR = "lightning"
STEPS_FILE = "steps.json"
"""Beside a run's metrics.csv: {"global_step": N} as of the part last saved, so a report can say
how far a checkpoint trained without unpickling Lightning's checkpoint."""
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric")
"""Where Lightning logs its start-up banners (devices, tips, `limit_val_batches`), one or the
other depending on import order."""


class SavePart(L.Callback):
    """Writes the channel's trained part (atomically) after every validation and at the end, then
    the step it was saved at (`STEPS_FILE` in the run's folder)."""

    def __init__(self, out_dir: Path, logs: Path):
        self.out_dir, self.logs = out_dir, logs

    def _save(self, trainer, module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            module.save_part(self.out_dir)
            atomic_write_text(self.logs / STEPS_FILE, json.dumps({"global_step": trainer.global_step}) + "\n")

    def on_validation_end(self, trainer, module) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer, module)


class AtomicCheckpointIO(L.pytorch.plugins.io.TorchCheckpointIO):
    """Lightning's resumable checkpoint, written to a temp file and renamed into place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class StepProgress(ProgressBar):
    """One bar over the run's optimizer steps: `step N/max_steps`, the logged losses, and the
    batches of a validation while it runs. (Lightning's own bars count each epoch's batches, and
    under max_steps alone read `Epoch 0/-2`.)"""

    def __init__(self):
        super().__init__()
        self.shown = True
        self.bar = None  # a rich Progress, from the first validation or training batch to the end of fit
        self.task = None

    def disable(self) -> None:
        self.shown = False

    def enable(self) -> None:
        self.shown = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._show(trainer)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._show(trainer, f" · validating {batch_idx + 1}/{trainer.num_val_batches[dataloader_idx]}")

    def on_validation_end(self, trainer, module) -> None:
        self._show(trainer)

    def teardown(self, trainer, module, stage: str) -> None:
        if stage == "fit":
            self._stop()

    def on_exception(self, trainer, module, exception) -> None:
        self._stop()

    def _show(self, trainer, doing: str = "") -> None:
        if not self.shown:
            return
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[metrics]}"))
            self.bar.start()
            self.task = self.bar.add_task("", total=trainer.max_steps, metrics="")
        metrics = " ".join(f"{k} {float(v):.3f}" for k, v in trainer.progress_bar_metrics.items())
        self.bar.update(self.task, completed=trainer.global_step, metrics=metrics,
                        description=f"step {trainer.global_step}/{trainer.max_steps}{doing}")

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextmanager
def quiet_lightning():
    """Lightning's start-up banners (rank-zero info logs) and the deprecation warning its
    `_pytree` draws from torch, hidden; its other warnings are left as they are."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass(frozen=True)
class TrainResult:
    """Where the run wrote, how far it got, and the team holding the trained generator."""

    out_dir: Path
    global_step: int
    interrupted: bool
    team: Team
    part: Path


def train(recipe, *, resume: bool = False, progress: bool = True, callbacks=()) -> TrainResult:
    """Train the part of the recipe's `train.channel` (the generator by default); checkpoints go
    to `train.out_dir`, beside the parts of other channels trained there.

    With `resume`, continue from `train.out_dir/lightning/last.ckpt` (loaded weights-only). The
    metrics and the Lightning checkpoint of a kv or latent run go in `train.out_dir/kv-run` or
    `latent-run` (`run_dir`), so runs of several channels into one folder keep their own.

    Raises:
        RecipeError, DataError, ModelLoadError, CheckpointError (resume without a checkpoint),
        DeviceError (a device, strategy or precision that cannot run here),
        OutputError (train.out_dir cannot be written, or another run is writing there).
    """
    cfg = recipe.train
    out_dir = Path(cfg.out_dir)
    logs = run_dir(out_dir, cfg.channel)
    last = logs / LIGHTNING_DIR / "last.ckpt"
    if resume and not last.is_file():
        raise CheckpointError(f"--resume: {last} does not exist; start without --resume or check train.out_dir")
    writable_dir(out_dir)  # fail before loading any weights, not at the first checkpoint
    # Two runs into one folder would write over each other's metrics and checkpoints. Lightning's
    # other ranks re-run this in processes of their own and share the folder of the first.
    holding = exclusive(writable_dir(logs), "tflow train") if _first_process() else nullcontext()
    with holding, quiet_lightning():
        return _fit(recipe, logs, resume, progress, callbacks)


def _fit(recipe, logs: Path, resume: bool, progress: bool, callbacks) -> TrainResult:
    """The body of `train`, once the run holds its folder."""
    cfg = recipe.train
    out_dir = Path(cfg.out_dir)
    last = logs / LIGHTNING_DIR / "last.ckpt"
    L.seed_everything(recipe.seed, verbose=False)
    splits = load_splits(recipe)  # data problems surface before any weights load
    teacher.check(recipe, splits)  # and a distillation teacher's
    if cfg.val_answers:
        callbacks = [*callbacks, ValAccuracy(cfg.channel, splits.val[:cfg.val_answers], cfg.batch_size)]
    trainer = _trainer(recipe, logs, progress, callbacks)  # and device problems
    team = load(recipe)
    splits = teacher.prepare(team, splits)  # a distillation objective's teacher, scored once
    module = registry.get(cfg.channel).part.module()(team, splits)
    shuffle = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(splits.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=list,
                              num_workers=cfg.num_workers, generator=shuffle)
    val_loader = DataLoader(splits.val, batch_size=cfg.batch_size, collate_fn=list, num_workers=cfg.num_workers)
    if not resume:
        trainer.validate(module, val_loader, verbose=False)  # val_loss before training, at step 0
    metrics = logs / "metrics.csv"
    backup = logs / "metrics.before-resume.csv"
    if resume and metrics.is_file():
        shutil.copyfile(metrics, backup)  # Lightning's CSV writer deletes the file it resumes into
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume else None, weights_only=True)
    except SystemExit:
        # Lightning turns Ctrl-C into a graceful teardown and then exits; a library returns instead.
        if not trainer.interrupted:
            raise
    if backup.is_file() and trainer.is_global_zero:
        _merge_metrics(backup, metrics)
    return TrainResult(out_dir, trainer.global_step, trainer.interrupted, team, out_dir / registry.get(cfg.channel).part.file)


def _trainer(recipe, logs: Path, progress: bool, callbacks) -> L.Trainer:
    """The run's Lightning Trainer, on the agents' device (`placement`).

    Raises:
        DeviceError: a setting Lightning refuses here (its message, on one line), or a precision
            the training device cannot compute in.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = recipe.train
    accelerator, devices = placement(recipe)
    try:
        trainer = L.Trainer(
            max_steps=cfg.max_steps,
            accelerator=accelerator,
            devices=devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=cfg.precision,
            accumulate_grad_batches=cfg.accumulate,
            gradient_clip_val=cfg.grad_clip,
            val_check_interval=cfg.val_every * cfg.accumulate,
            limit_val_batches=cfg.val_batches if cfg.val_batches is not None else 1.0,
            check_val_every_n_epoch=None,
            log_every_n_steps=cfg.log_every,
            logger=_logger(cfg, logs),
            callbacks=[
                SavePart(Path(cfg.out_dir), logs),
                ModelCheckpoint(dirpath=logs / LIGHTNING_DIR, save_last=True, save_top_k=0,
                                every_n_train_steps=cfg.val_every),
                *([StepProgress()] if progress else []),
                *callbacks,
            ],
            plugins=[AtomicCheckpointIO()],
            num_sanity_val_steps=0,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=logs,
        )
    except Exception as err:  # Lightning refuses settings with several types (Misconfiguration, Value, ...)
        raise DeviceError(f"train: Lightning cannot run strategy={cfg.strategy!r}, accelerator={accelerator!r}, "
                          f"devices={devices!r} here ({first_line(err)})") from None
    if cfg.precision != "32":
        dtype = torch.bfloat16 if cfg.precision.startswith("bf16") else torch.float16
        check_dtype(dtype, trainer.strategy.root_device, f"train.precision {cfg.precision!r}",
                    "set train.precision: 32")
    return trainer


def placement(recipe) -> tuple[str, int | str | list[int]]:
    """Lightning's accelerator and devices for a run: as `train` sets them, except that
    `train.accelerator: auto` trains where the agents run (`model.device`), on that very GPU when
    it is one of one.

    Raises:
        DeviceError: an agent's device does not exist here, or agents on different devices.
    """
    cfg = recipe.train
    device = agents_device(recipe)
    if cfg.accelerator != "auto":
        return cfg.accelerator, cfg.devices
    if device.type == "cuda" and cfg.devices in ("auto", 1):
        return "cuda", [device.index]
    return device.type, 1 if cfg.devices == "auto" else cfg.devices


def run_dir(out_dir: Path, channel: str) -> Path:
    """Where a run of `channel` into `out_dir` keeps metrics.csv and its Lightning checkpoint
    (`TrainedPart.run_dir`; by default `<channel>-run`)."""
    part = registry.get(channel).part
    return out_dir / (part.run_dir if part.run_dir is not None else f"{channel}-run")


def _first_process() -> bool:
    """Whether this is the process a run starts in, not one of the ranks Lightning or torchrun starts."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _merge_metrics(earlier: Path, later: Path) -> None:
    """Put the rows of an earlier run before a resumed run's rows (those it redid are dropped)."""
    old, new = (list(csv.DictReader(p.open())) if p.is_file() else [] for p in (earlier, later))
    start = min((int(r["step"]) for r in new), default=None)
    rows = [r for r in old if start is None or int(r["step"]) < start] + new
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(later, buffer.getvalue())
    earlier.unlink()


def _logger(cfg, out_dir: Path):
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out_dir, name="", version="")
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=out_dir)
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(out_dir, name="", version="")
