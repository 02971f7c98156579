"""The recipe sections every team has: backbones, agents, data, training and decoding.

The channels' own sections (generator, fusion, kv, latent) live beside each channel
(`tflow.channels.<name>.settings`) and join the recipe through the channel registry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tflow import tasks
from tflow.agents.agent import CONTEXT_POSITIONS
from tflow.backbones import gguf as gguf_models
from tflow.backbones import tiny
from tflow.config.base import LOCAL_DATA_SUFFIXES, Section, home, looks_local, show, suggest
from tflow.errors import ModelLoadError


class TinySection(Section):
    """A tiny randomly initialised model with a locally trained BPE tokenizer."""

    arch: Literal[tuple(tiny.ARCHS)] = "qwen3"
    """Its architecture (transformers' decoder layout), one of `tflow.backbones.tiny.ARCHS`."""
    hidden_size: int = Field(64, gt=0)
    """Width of the residual stream; `num_heads` must divide it."""
    num_layers: int = Field(2, gt=0)
    """Number of decoder layers."""
    num_heads: int = Field(4, gt=0)
    """Attention heads; must divide `hidden_size`."""
    num_kv_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention); must divide `num_heads`."""
    vocab_size: int = Field(512, gt=0)
    """Target vocabulary of the BPE tokenizer trained on tflow's built-in corpus."""
    seed: int = 0
    """Seed of the random initialisation."""

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_hidden(cls, heads: int, info) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % heads:
            raise ValueError(f"must divide hidden_size {hidden}, got {heads}")
        return heads

    @field_validator("num_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, kv: int, info) -> int:
        heads = info.data.get("num_heads")
        if heads is not None and heads % kv:
            raise ValueError(f"must divide num_heads {heads}, got {kv}")
        return kv


class ModelSection(Section):
    """A backbone: the weights and tokenizer an agent runs on."""

    path: str = Field(min_length=1)
    """Hub id (`Qwen/Qwen3-4B`), local folder with weights and tokenizer (`./models/qwen`), a
    `.gguf` file, or `package:NAME/FILE.gguf` for a GGUF file inside an installed Python package."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the frozen weights are loaded in; refused on a device that cannot compute in it."""
    device: str = "auto"
    """`auto` (first GPU if any, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`. Senders and receiver
    run on one device. Checked against the machine when the weights load (`tflow validate` does not,
    so a recipe can be checked on another machine than the one that runs it)."""
    tiny: TinySection | None = None
    """If set and `path` does not exist locally, tflow builds a tiny model there on first use."""
    cache_dir: str = "runs/models/gguf"
    """Where a GGUF `path` is dequantized once, as safetensors keyed by the file's SHA-256."""

    @field_validator("path")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        path = home(path)
        if gguf_models.is_gguf(path):
            try:
                gguf_models.resolve(path)
            except ModelLoadError as err:
                raise ValueError(str(err).removeprefix("model.path: ")) from None
        return path

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {show(device)}")
        return device

    @model_validator(mode="after")
    def _local_path_exists(self) -> ModelSection:
        # Only unmistakably local paths: `org/name` may be a hub id.
        if self.tiny is None and looks_local(self.path) and not Path(self.path).exists():
            raise PydanticCustomError(
                "model_path_not_found",
                "path: folder not found: {value} (set tiny to build a tiny model there)",
                {"value": self.path},
            )
        return self


class SenderSection(Section):
    """One frozen, role-prompted sender agent."""

    name: str = Field(min_length=1)
    """Unique name of the sender (used in logs, usage ledgers and `data.fields.context`)."""
    role: str = Field(min_length=1)
    """The sender's system prompt: what it should pass on to the receiver."""
    context: str | None = None
    """Private context only this sender reads with every query (per-query context comes from data)."""
    model: ModelSection | None = None
    """Its own backbone; by default it shares the top-level `model`. It may differ from the
    receiver's and other senders' in architecture, width, depth, tokenizer and chat template:
    each sender backbone gets its own layer aggregation (and a projection when widths differ)."""
    context_position: Literal[CONTEXT_POSITIONS] = "before_query"
    """Where a private document goes in the sender's user turn. `after_query` lets every
    document token's hidden state see the question (causal attention), so the states that hold
    the asked fact can tell it from the rest."""


class ReceiverSection(Section):
    """The agent that answers, patched with the fused deltas of the senders."""

    name: str = Field("executor", min_length=1)
    """Name of the receiver; no sender may share it."""
    system_prompt: str | None = None
    """Receiver's system prompt; null sends none."""
    model: ModelSection | None = None
    """Its own backbone; by default it shares the top-level `model`."""


class FieldsSection(Section):
    """Which dataset columns hold what."""

    question: str = "question"
    """Column with the query."""
    answer: str = "answer"
    """Column with the reference answer (the training target)."""
    context: dict[str, str] = Field(default_factory=dict)
    """Sender name → column with that sender's private per-query context."""


class RelaySection(Section):
    """The synthetic relay task: a fact only a sender sees must reach the receiver."""

    n_train: int = Field(2000, gt=0)
    """Training examples."""
    n_test: int = Field(200, gt=0)
    """Test examples (read only by `tflow eval`)."""
    n_val: int = Field(200, gt=0)
    """Validation examples: what training validates on and every choice is made on; generated like
    the training examples, and no test fact (entity, value) is in any of them."""
    seed: int = 0
    """Seed of the generated examples."""
    format: Literal["toy", "documents", "category"] = "toy"
    """`toy`: one fact per sender, answered with the value. `documents`: each sender reads
    `facts` facts, the others' documents hold confusable ones; answered in one sentence.
    `category`: `documents` whose passwords are animals, colors, fruits or metals, asked which of
    the four the city's password is (in no document; chance 1/4); answered in one sentence."""
    facts: int = Field(4, ge=2, le=16)
    """Facts per sender document in the `documents` and `category` formats (`category` draws
    disjoint splits up to about 12 facts per example, senders times facts: its 64 passwords over
    32 cities run out)."""


class DataSection(Section):
    """The dataset for training and evaluation."""

    task: str | None = None
    """Task name (e.g. `gsm8k`, `relay`) selecting prompt format, answer extraction and scoring."""
    source: str | None = None
    """Hub dataset id, or a local .json/.jsonl/.parquet/.csv file (relative to the working directory)."""
    config: str | None = None
    """Hub dataset configuration name (e.g. `main` for gsm8k)."""
    split: str = "train"
    """Split to train on."""
    val_split: str | None = None
    """Split to validate on; null holds out `val_fraction` of `split`."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of `split` held out for validation when `val_split` is null."""
    fields: FieldsSection = Field(default_factory=FieldsSection)
    """Column names."""
    limit: int | None = Field(None, gt=0)
    """Use at most this many examples of each split; null uses all."""
    relay: RelaySection | None = None
    """Settings of the synthetic relay task."""

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in tasks.available():
            known = tasks.available()
            raise ValueError(f"unknown task {show(task)}{suggest(task, known)}; available: {', '.join(known)}")
        return task

    @field_validator("source")
    @classmethod
    def _local_source_exists(cls, source: str | None) -> str | None:
        source = source and home(source)
        local = source and looks_local(source, LOCAL_DATA_SUFFIXES)
        if local and not Path(source).exists():
            raise ValueError(f"file not found: {source}")
        return source

    @model_validator(mode="after")
    def _task_or_source(self) -> DataSection:
        if self.task is None and self.source is None:
            raise ValueError("set task (e.g. gsm8k, relay) or source (a hub id or local file)")
        return self


class TrainSection(Section):
    """Training on Lightning of one channel's parts; the backbones stay frozen."""

    channel: str = "weights"
    """The channel whose trained part to train (one with a trained part in the channel
    registry): `weights` the generator, `kv` the receiver's LoRA over the senders' KV trace
    (DiffMAS), `latent` the InnerLinks and OuterLinks (RecursiveMAS)."""

    max_steps: int = Field(200, gt=0)
    """Optimizer steps to train for."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps before the peak learning rate."""
    batch_size: int = Field(8, gt=0)
    """Queries per device per step."""
    accumulate: int = Field(1, gt=0)
    """Gradient accumulation: batches per optimizer step."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null disables clipping."""
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    """Lightning precision of the trained part's computation: `32`, `bf16-mixed` (autocast to
    bfloat16, on GPUs with bfloat16 and on CPUs) or `16-mixed`."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in backward to save memory."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Lightning distributed strategy (`fsdp` needs CUDA)."""
    accelerator: str = "auto"
    """Lightning accelerator: `auto` (where the agents run, `model.device`), `cpu`, `gpu`, `cuda` or `mps`."""
    devices: int | Literal["auto"] = "auto"
    """Devices per node: a positive count or `auto`."""
    num_nodes: int = Field(1, ge=1)
    """Machines to train on."""
    out_dir: str = "runs/train"
    """Folder for checkpoints, logs and the resolved recipe (relative to the working directory)."""
    val_every: int = Field(50, gt=0)
    """Validate every this many optimizer steps."""
    val_batches: int | None = Field(None, gt=0)
    """Validate on the first this many batches only; null: the whole validation split."""
    val_answers: int = Field(0, ge=0)
    """At each validation (and at step 0) the channel also answers the first this many validation
    queries, greedily with the recipe's `generate` settings, and `val_accuracy` is logged beside
    val_loss; 0: no answers, loss only."""
    log_every: int = Field(10, gt=0)
    """Log metrics every this many optimizer steps."""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """Where metrics go."""
    num_workers: int = Field(0, ge=0)
    """Data loader worker processes."""
    max_length: int = Field(512, gt=0)
    """Truncate prompt plus answer to this many tokens."""
    objective: Literal["ce", "distill", "ce+distill"] = "ce"
    """What the answer tokens are trained on, for every channel: `ce` cross-entropy on the answer
    target; `distill` the KL divergence from the teacher's distribution at each answer token
    (its top `distill_top_k` tokens and one bucket for the rest), averaged per example;
    `ce+distill` their sum, distill weighted by `distill_weight`. The teacher scores every
    training and validation answer once before training (cached in `teacher_cache`)."""
    teacher: str = "context"
    """The distillation teacher: the receiver reading what this control channel gives it,
    `context` (every sender's document in its own prompt) or `text` (the senders' text messages)."""
    teacher_checkpoint: str | None = None
    """A train.out_dir holding the teacher channel's trained control (`tflow train RECIPE
    train.channel=context`), whose receiver LoRA the teacher reads with; null: the untrained
    receiver. A folder that does not exist, or lacks that part, is an error."""
    teacher_cache: str = "runs/cache/teacher"
    """Folder of the teacher's cached top-k log-probs, one file per split named and checked by a
    key over everything that determines them, so runs that share a teacher share its scores, and
    a file of another teacher, model, recipe, task or split is rebuilt, never used."""
    distill_top_k: int = Field(16, gt=0)
    """Teacher tokens kept per answer token."""
    distill_weight: float = Field(1.0, gt=0)
    """Weight of the distillation term in `ce+distill`."""

    @field_validator("channel")
    @classmethod
    def _trained_channel(cls, channel: str) -> str:
        from tflow.channels import registry

        if channel not in registry.trained():
            known = registry.trained()
            raise ValueError(f"must be a channel with a trained part, one of {', '.join(known)}, got {show(channel)}"
                             f"{suggest(channel, known)}")
        return channel

    @field_validator("teacher")
    @classmethod
    def _teacher_channel(cls, teacher: str) -> str:
        from tflow.channels import registry

        known = [c.name for c in registry.channels() if c.part is not None and c.part.turns is not None]
        if teacher not in known:
            raise ValueError(f"must be a control channel, one of {', '.join(known)}, got {show(teacher)}"
                             f"{suggest(teacher, known)}")
        return teacher

    @field_validator("out_dir", "teacher_checkpoint", "teacher_cache")
    @classmethod
    def _expand_home(cls, path: str | None) -> str | None:
        return path and home(path)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, precision: Any) -> Any:
        # YAML reads `precision: 32` as an integer; Lightning's name for it is the string "32".
        return str(precision) if type(precision) is int else precision

    @field_validator("devices", mode="before")
    @classmethod
    def _count_or_auto(cls, devices: Any) -> Any:
        # Checked before the union so one readable message replaces one error per union member.
        if devices == "auto" or (type(devices) is int and devices > 0):
            return devices
        if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
            return int(devices)
        raise ValueError(f"expected a positive integer or 'auto', got {show(devices)}")


class GenerateSection(Section):
    """Decoding settings of the receiver (and of senders in the text channel)."""

    max_new_tokens: int = Field(64, gt=0)
    """Most tokens the receiver generates per answer."""
    do_sample: bool = False
    """Sample instead of greedy / beam decoding."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with `do_sample`)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (with `do_sample`)."""
    num_beams: int = Field(1, ge=1)
    """Beam width; 1 decodes without beam search."""
    message_tokens: int = Field(256, gt=0)
    """Text channel only: most tokens each sender's message may have."""

