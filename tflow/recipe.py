"""Recipe schema: the YAML that drives training, evaluation and `tflow ask`, validated all at once.

`load_recipe(path, overrides)` reads YAML, applies `key.path=value` overrides, validates against the
pydantic models below and raises one `RecipeError` listing every problem as `key.path: message`,
with the key path exactly as the user writes it. The docstring under each field is its reference
documentation: `reference_markdown()` renders docs/recipes.md from them.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tflow import gguf_models, tasks
from tflow.errors import ModelLoadError, RecipeError
from tflow.overrides import collect_overrides, load_yaml

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _looks_local(path: str, suffixes: Sequence[str] = ()) -> bool:
    return path.startswith(("./", "../", "/", "~")) or path.lower().endswith(tuple(suffixes))


def _home(path: str) -> str:
    """`path` with a leading `~` or `~user` expanded, as a shell would (unchanged for an unknown user)."""
    return os.path.expanduser(path)


class TinySection(_Section):
    """A tiny randomly initialised model with a locally trained BPE tokenizer."""

    arch: Literal["qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3", "phi3", "olmo2"] = "qwen3"
    """Its architecture (transformers' decoder layout), one of `tiny.ARCHS`."""
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


class ModelSection(_Section):
    """A backbone: the weights and tokenizer an agent runs on."""

    path: str = Field(min_length=1)
    """Hub id (`Qwen/Qwen3-4B`), local folder with weights and tokenizer (`./models/qwen`), a
    `.gguf` file, or `package:NAME/FILE.gguf` for a GGUF file inside an installed Python package."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the frozen weights are loaded in."""
    device: str = "auto"
    """`auto` (first GPU if any, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    tiny: TinySection | None = None
    """If set and `path` does not exist locally, tflow builds a tiny model there on first use."""
    cache_dir: str = "runs/models/gguf"
    """Where a GGUF `path` is dequantized once, as safetensors keyed by the file's SHA-256."""

    @field_validator("path")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        path = _home(path)
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
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {_show(device)}")
        return device

    @model_validator(mode="after")
    def _local_path_exists(self) -> ModelSection:
        # Only unmistakably local paths: `org/name` may be a hub id.
        if self.tiny is None and _looks_local(self.path) and not Path(self.path).exists():
            raise PydanticCustomError(
                "model_path_not_found",
                "path: folder not found: {value} (set tiny to build a tiny model there)",
                {"value": self.path},
            )
        return self


class SenderSection(_Section):
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
    context_position: Literal["before_query", "after_query"] = "before_query"
    """Where a private document goes in the sender's user turn. `after_query` lets every
    document token's hidden state see the question (causal attention), so the states that hold
    the asked fact can tell it from the rest."""


class ReceiverSection(_Section):
    """The agent that answers, patched with the fused deltas of the senders."""

    name: str = Field("executor", min_length=1)
    """Name of the receiver; no sender may share it."""
    system_prompt: str | None = None
    """Receiver's system prompt; null sends none."""
    model: ModelSection | None = None
    """Its own backbone; by default it shares the top-level `model`."""


class GeneratorSection(_Section):
    """The hypernetwork turning sender hidden states into per-query LoRA factors."""

    kind: Literal["param_tokens", "mlp", "basis"] = "param_tokens"
    """Architecture: `param_tokens` (transformer over parameter tokens, the paper's), `mlp`, or
    `basis` (the param-token trunk emitting a K x K core per module on a shared learned basis)."""
    rank: int | None = Field(None, gt=0)
    """LoRA rank r of each sender's delta (the fused delta has rank r × senders); for `basis`, the
    basis size K (senders' cores add, so the fused delta has rank K). null: 4, or 16 for `basis`."""
    alpha: float = Field(8.0, gt=0)
    """LoRA alpha; deltas are scaled by alpha / rank."""
    targets: list[str] | None = Field(None, min_length=1)
    """Linear module kinds of the receiver to patch in each targeted layer; null: every linear kind
    of the receiver's family (q/k/v/o/gate/up/down_proj; Phi-3's fused qkv_proj, o_proj,
    gate_up_proj, down_proj). On Phi-3 a part name targets its whole fused module (q_proj, k_proj,
    v_proj: qkv_proj; gate_proj, up_proj: gate_up_proj). Name them by hand for a model of another
    layout."""
    layers: list[int] | None = None
    """Decoder layer indices to patch; null patches every layer."""
    d_model: int = Field(256, gt=0)
    """Hidden width of the generator."""
    depth: int = Field(2, ge=1)
    """Number of generator blocks."""
    heads: int = Field(4, ge=1)
    """Attention heads in each generator block; must divide `d_model`."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the generator during training."""
    head_scale: float | None = Field(None, gt=0)
    """Multiplier on the B heads' output; null: 1 / d_model, which keeps each optimizer step's
    change of the delta near lr whatever d_model (with 1, training diverges on deep receivers)."""
    copy_head: bool = False
    """Add a copy head (`tflow.copy_head`): one rank per sender token on the receiver's LM head,
    keyed by the sender's state before the token and voting for that token, so the receiver can
    state a sender's exact value (a name, a number). Needs senders on the receiver's backbone
    and tokenizer; not with `basis`. It makes the delta's rank the senders' length."""
    max_delta_norm: float | None = Field(None, gt=0)
    """Largest norm of a query's delta the receiver accepts: the Frobenius norm of all its modules'
    updates together, sqrt(sum ||scale·B A||²). A query whose delta exceeds it, or is not finite
    (always refused), is answered without the delta and its reply says so; null: no bound."""

    @model_validator(mode="after")
    def _default_rank(self) -> GeneratorSection:
        if self.copy_head and self.kind == "basis":
            raise ValueError("copy_head: not available with kind basis (its deltas live on a shared basis); "
                             "use param_tokens or mlp")
        if self.rank is None:
            self.rank = 16 if self.kind == "basis" else 4
        return self

    @field_validator("targets", "layers")
    @classmethod
    def _unique(cls, items: list | None) -> list | None:
        dupes = sorted({x for x in items or () if items.count(x) > 1}, key=str)
        if dupes:
            raise ValueError(f"lists {', '.join(map(str, dupes))} more than once")
        return items

    @field_validator("layers")
    @classmethod
    def _non_negative(cls, layers: list[int] | None) -> list[int] | None:
        if layers == []:
            raise ValueError("must not be empty (null patches every layer)")
        if layers and min(layers) < 0:
            raise ValueError(f"must be layer indices >= 0, got {_show(layers)}")
        return layers

    @field_validator("heads")
    @classmethod
    def _heads_divide_d_model(cls, heads: int, info) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % heads:
            raise ValueError(f"must divide d_model {d_model}, got {heads}")
        return heads


class KVSection(_Section):
    """The kv channel (DiffMAS; LatentMAS while untrained): senders build a shared KV trace in turn,
    the receiver decodes on it with its own LoRA."""

    latent_steps: int = Field(10, ge=0)
    """Latent steps each sender runs after prefilling its turn onto the trace: its last-layer
    state, rescaled to the mean input-embedding norm, becomes the next input embedding."""
    realign: bool = False
    """Map each last-layer state into the input-embedding space with LatentMAS's ridge matrix
    W_a = (W_out^T W_out + 1e-5 I)^-1 W_out^T W_in before the norm rescaling (about the identity
    for tied embeddings)."""
    rank: int = Field(8, gt=0)
    """Rank of the receiver's LoRA (trained by `tflow train RECIPE train.channel=kv`)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    targets: list[str] | None = Field(None, min_length=1)
    """Linear module kinds of the receiver the LoRA adapts in each layer; null: every linear kind
    of the receiver's family, as for `generator.targets`."""
    layers: list[int] | None = None
    """Decoder layer indices the LoRA adapts; null: every layer."""

    _unique = field_validator("targets", "layers")(GeneratorSection._unique.__func__)
    _non_negative = field_validator("layers")(GeneratorSection._non_negative.__func__)


class LatentSection(_Section):
    """The latent channel (RecursiveMAS): latent thoughts through trained links, spliced into the
    receiver's prompt."""

    latent_steps: int = Field(16, ge=0)
    """Latent thoughts each sender rolls out: its last-layer state through its InnerLink, fed
    back as the next input embedding."""
    rounds: int = Field(1, ge=1)
    """Recursion rounds: after each but the last, the receiver's own latent thoughts go back to
    the first sender through the feedback OuterLink."""
    hidden: int | None = Field(None, gt=0)
    """Hidden width of every link's MLP; null: the width of the link's input."""
    inner_weight: float = Field(1.0, ge=0)
    """Weight of the InnerLinks' loss, (1 - cos) + 0.1 MSE against the next token's embedding,
    beside the receiver's cross-entropy that trains the OuterLinks."""
    inner_text: Literal["prompt", "answer"] = "prompt"
    """The text an InnerLink learns on: `prompt`, each position of the sender's own prompt
    (RecursiveMAS's next-embedding objective on text); `answer`, the sender's prompt continued by
    the gold answer, from the prompt's last position on: the regime a rollout runs in, where thought
    t stands in for the t-th token the sender would say."""


class FusionSection(_Section):
    """How the deltas of several senders are combined."""

    gate_init: float = Field(1.0, gt=0)
    """Initial value of each sender's gate g_s, a learned positive scalar (softplus-parameterised)
    that scales its B factors before exact rank-concatenation."""


class FieldsSection(_Section):
    """Which dataset columns hold what."""

    question: str = "question"
    """Column with the query."""
    answer: str = "answer"
    """Column with the reference answer (the training target)."""
    context: dict[str, str] = Field(default_factory=dict)
    """Sender name → column with that sender's private per-query context."""


class RelaySection(_Section):
    """The synthetic relay task: a fact only a sender sees must reach the receiver."""

    n_train: int = Field(2000, gt=0)
    """Training examples."""
    n_test: int = Field(200, gt=0)
    """Test examples."""
    seed: int = 0
    """Seed of the generated examples."""
    format: Literal["toy", "documents"] = "toy"
    """`toy`: one fact per sender, answered with the value. `documents`: each sender reads
    `facts` facts, the others' documents hold confusable ones; answered in one sentence."""
    facts: int = Field(4, ge=2, le=16)
    """Facts per sender document in the `documents` format."""


class DataSection(_Section):
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
            raise ValueError(f"unknown task {_show(task)}{_suggest(task, known)}; available: {', '.join(known)}")
        return task

    @field_validator("source")
    @classmethod
    def _local_source_exists(cls, source: str | None) -> str | None:
        source = source and _home(source)
        local = source and _looks_local(source, LOCAL_DATA_SUFFIXES)
        if local and not Path(source).exists():
            raise ValueError(f"file not found: {source}")
        return source

    @model_validator(mode="after")
    def _task_or_source(self) -> DataSection:
        if self.task is None and self.source is None:
            raise ValueError("set task (e.g. gsm8k, relay) or source (a hub id or local file)")
        return self


class TrainSection(_Section):
    """Training on Lightning of one channel's parts; the backbones stay frozen."""

    channel: Literal["weights", "kv", "latent"] = "weights"
    """What to train: `weights` the generator, `kv` the receiver's LoRA over the senders' KV
    trace (DiffMAS), `latent` the InnerLinks and OuterLinks (RecursiveMAS)."""

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
    """Lightning precision of the generator's computation."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in backward to save memory."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Lightning distributed strategy."""
    accelerator: str = "auto"
    """Lightning accelerator: `auto`, `cpu`, `gpu`, `cuda` or `mps`."""
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
    log_every: int = Field(10, gt=0)
    """Log metrics every this many optimizer steps."""
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    """Where metrics go."""
    num_workers: int = Field(0, ge=0)
    """Data loader worker processes."""
    max_length: int = Field(512, gt=0)
    """Truncate prompt plus answer to this many tokens."""

    @field_validator("out_dir")
    @classmethod
    def _expand_home(cls, out_dir: str) -> str:
        return _home(out_dir)

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
        raise ValueError(f"expected a positive integer or 'auto', got {_show(devices)}")


class GenerateSection(_Section):
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


class Recipe(_Section):
    """A complete tflow setup: agents, generator, data, training and decoding."""

    model: ModelSection
    """The shared frozen backbone of every agent without its own `model`."""
    senders: list[SenderSection] = Field(min_length=1)
    """The sender agents, in order."""
    receiver: ReceiverSection = Field(default_factory=ReceiverSection)
    """The receiver agent."""
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    """The parameter generator."""
    fusion: FusionSection = Field(default_factory=FusionSection)
    """Fusion of the senders' deltas."""
    kv: KVSection = Field(default_factory=KVSection)
    """The kv channel."""
    latent: LatentSection = Field(default_factory=LatentSection)
    """The latent channel."""
    data: DataSection | None = None
    """The dataset; needed by train and eval, not by ask or demo."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Training settings."""
    generate: GenerateSection = Field(default_factory=GenerateSection)
    """Decoding settings."""
    seed: int = 0
    """Global seed (generator init, data shuffling, sampling)."""

    @model_validator(mode="after")
    def _names_agree(self) -> Recipe:
        problems = _name_problems(
            [s.name for s in self.senders], self.receiver.name,
            list(self.data.fields.context) if self.data else [],
        )
        if problems:
            raise PydanticCustomError("recipe_names", "{message}", {"message": "; ".join(problems)})
        return self

    @model_validator(mode="after")
    def _trace_without_checkpointing(self) -> Recipe:
        if self.train.channel in ("kv", "latent") and self.train.gradient_checkpointing:
            raise ValueError(f"train.gradient_checkpointing: must be false with train.channel={self.train.channel} "
                             "(HF drops the past cache a trace is read with while checkpointing)")
        return self

    def to_dict(self) -> dict:
        """The resolved recipe (every default filled in) as plain YAML-safe data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, for saving beside checkpoints; `load_recipe` reads it back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def load_recipe(source: str | Path | Mapping, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe from a YAML file (or take a mapping), apply `key.path=value` overrides, validate.

    Relative paths inside the recipe resolve against the current working directory.

    Raises:
        RecipeError: listing every problem at once: a missing file, a YAML syntax error (with its
            line), malformed overrides and every schema violation as `key.path: message`.
    """
    where = None
    if isinstance(source, Mapping):
        data = source
    else:
        where = str(source)
        data = _read_yaml(Path(source))
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise RecipeError([f"a recipe must be a mapping of sections (model, senders, ...), got {got}"],
                          where)
    data, problems = collect_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        explained = [m for e in err.errors() if (m := _explain(e))] + _raw_name_problems(data)
        problems += explained or [str(err)]
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), where)
    return recipe


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError([f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8"], str(path)) from None
    except OSError as err:
        raise RecipeError([f"cannot read the recipe: {err.strerror or err}"], str(path)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError([f"{line}invalid YAML: {err.problem or err.context}"], str(path)) from None
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {err}"], str(path)) from None


def _name_problems(senders: list[str | None], receiver: str, context_keys: list[str]) -> list[str]:
    """Cross-section name checks; `senders` holds each sender's name (None where it has none yet)."""
    problems, first = [], {}
    for i, name in enumerate(senders):
        if name is None:
            continue
        if name == receiver:
            problems.append(f"senders.{i}.name: {name!r} is the receiver's name; "
                            "give the sender another name")
        elif name in first:
            problems.append(f"senders.{i}.name: duplicate sender name {name!r} "
                            f"(also senders.{first[name]}.name)")
        first.setdefault(name, i)
    for key in context_keys:
        if key not in first:
            problems.append(f"data.fields.context.{key}: no sender named {key!r} "
                            f"(senders: {', '.join(first)})")
    return problems


def _raw_name_problems(data: Mapping) -> list[str]:
    """`_name_problems` on unvalidated data, so name clashes are reported beside any other problem."""
    senders = data.get("senders")
    receiver = data.get("receiver")
    fields = data.get("data", {}).get("fields", {}) if isinstance(data.get("data"), Mapping) else {}
    context = fields.get("context") if isinstance(fields, Mapping) else None
    return _name_problems(
        [s.get("name") if isinstance(s, Mapping) and isinstance(s.get("name"), str) else None
         for s in (senders if isinstance(senders, list) else [])],
        receiver["name"] if isinstance(receiver, Mapping) and isinstance(receiver.get("name"), str)
        else ReceiverSection.model_fields["name"].default,
        [str(k) for k in context] if isinstance(context, Mapping) else [],
    )


# --- pydantic errors -> `key.path: message` -------------------------------------------------------

_EXPECTED = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "a list", "dict": "a mapping", "model": "a section (a mapping of keys)",
    "model_attributes": "a section (a mapping of keys)",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _explain(error: dict) -> str | None:
    """A short, actionable `key.path: message` for one pydantic error (None for name-check errors)."""
    kind, loc, value, ctx = error["type"], error["loc"], error.get("input"), error.get("ctx", {})
    path = ".".join(map(str, loc))
    if kind == "recipe_names":
        return None  # reported by _raw_name_problems, which also runs when other sections fail
    if kind == "model_path_not_found":
        where = f"{path}." if path else ""
        return (f"{where}path: folder not found: {ctx['value']} "
                f"(set {where}tiny to build a tiny model there)")
    base = kind.removesuffix("_type").removesuffix("_parsing").removesuffix("_from_float")
    if kind == "missing":
        message = "field required"
    elif kind == "extra_forbidden":
        keys = _keys_at(loc[:-1])
        listing = f" (expected one of: {', '.join(keys)})" if keys else ""
        hint = _suggest(str(loc[-1]), keys) or listing
        message = "unknown key" + hint
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        message = f"must be {_BOUNDS[kind]} {_show(bound)}, got {_show(value)}"
    elif kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        message = f"must be one of {', '.join(choices)}, got {_show(value)}"
        message += _suggest(str(value), choices)
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif base in _EXPECTED:
        # YAML turns unquoted `yes`, `1.0` or `a: b` into other types; quoting keeps them text
        quote = " (quote it to keep it text)" if base == "string" else ""
        message = f"expected {_EXPECTED[base]}, got {_show(value)}{quote}"
    else:
        message = error["msg"]
    return f"{path}: {message}" if path else message


def _show(value: Any) -> str:
    """A value in an error message, as the user would write it in YAML (strings quoted), kept short."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = _yaml(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _yaml(value: Any) -> str:
    """A value as inline YAML (`null`, `true`, `[a, b]`)."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
        return text.strip().removesuffix("...").strip()
    except yaml.YAMLError:  # not plain data (an object passed from Python)
        return repr(value)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list):
        return next(filter(None, map(_section_of, get_args(annotation))), None)
    return None


def _keys_at(loc: Sequence[str | int]) -> list[str]:
    """The keys allowed in the section at `loc` (list indices skipped), for suggestions."""
    section: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or section is None:
            continue
        field = section.model_fields.get(part)
        section = _section_of(field.annotation) if field else None
    return list(section.model_fields) if section else []


# --- reference docs -------------------------------------------------------------------------------

_INTRO = """\
# Recipe reference

<!-- Generated from the schema in tflow/recipe.py; do not edit by hand.
     Regenerate with: python -m tflow.recipe > docs/recipes.md -->

A recipe is one YAML file describing a tflow setup: the agents, the parameter generator, the data,
training and decoding. Every command takes one (`tflow train RECIPE`, `tflow eval RECIPE`, ...)
and `tflow validate RECIPE` checks it without loading any weights.

```yaml
model:
  path: Qwen/Qwen3-4B
  dtype: bfloat16
senders:
  - name: strategist
    role: Explain how to approach the task, not the answer.
  - name: extractor
    role: List the facts, formulas and constraints the task needs. Do not solve it.
data:
  task: gsm8k
  source: openai/gsm8k
  config: main
train:
  max_steps: 1000
```

Only `model` and `senders` are required; every other key has the default listed below.

**Overrides.** Any key can be set on the command line as `key.path=value`, after the recipe:
`tflow train recipes/tiny.yaml train.max_steps=40 generator.targets=[q_proj,v_proj]
senders.0.role="Be brief."`. Values are parsed as YAML (`40` is an integer, `true` a boolean,
`[a,b]` a list, `null` unsets); list items are addressed by index (`senders.0.role`).
Overrides go through the same validation as the file.

**Errors.** Unknown keys are errors. Every problem is reported at once, one line each, with the
key path as you would type it in an override, e.g. `train.lr: must be > 0, got -1` or
`train.max_stepz: unknown key (did you mean max_steps?)`.

**Paths.** Relative paths (`model.path`, `data.source`, `train.out_dir`) resolve against the
current working directory, not the recipe's folder; a leading `~` is your home folder. A
`model.path` starting with `./`, `../`, `/` or `~` must exist unless `model.tiny` is set; a
`data.source` that looks like a local file (such a prefix, or a .json/.jsonl/.parquet/.csv name)
must exist. Anything else is a hub id.
"""


def reference_markdown() -> str:
    """docs/recipes.md, rendered from the schema's field docstrings."""
    out = [_INTRO]
    sections = [
        ("Top level", "", Recipe),
        ("model", "model.", ModelSection),
        ("model.tiny", "model.tiny.", TinySection),
        ("senders", "senders.N.", SenderSection),
        ("receiver", "receiver.", ReceiverSection),
        ("generator", "generator.", GeneratorSection),
        ("fusion", "fusion.", FusionSection),
        ("kv", "kv.", KVSection),
        ("latent", "latent.", LatentSection),
        ("data", "data.", DataSection),
        ("data.fields", "data.fields.", FieldsSection),
        ("data.relay", "data.relay.", RelaySection),
        ("train", "train.", TrainSection),
        ("generate", "generate.", GenerateSection),
    ]
    for title, prefix, section in sections:
        out.append(f"\n## {title}\n\n{section.__doc__}\n")
        if section in (SenderSection, ReceiverSection):
            out.append(f"`{prefix}model` takes the same keys as [model](#model).\n")
        out.append("| key | type | default | description |\n|---|---|---|---|")
        for name, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else _doc_default(default)
            description = " ".join((field.description or "").split())
            out.append(f"| `{prefix}{name}` | {_doc_type(field)} | {default} | {description} |")
    return "\n".join(out) + "\n"


def _doc_default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value}`" if isinstance(value, str) else f"`{_yaml(value)}`"


_DOC_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))


def _doc_type(field) -> str:
    text = _type_name(field.annotation)
    for meta in field.metadata:
        text += "".join(f", {sign} {_show(getattr(meta, attr))}"
                        for cls, attr, sign in _DOC_BOUNDS if isinstance(meta, cls))
        if isinstance(meta, MinLen) and meta.min_length:
            text += ", not empty"
    return text


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return annotation.__name__


if __name__ == "__main__":
    print(reference_markdown(), end="")
