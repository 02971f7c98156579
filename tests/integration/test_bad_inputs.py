"""Bad input over the CLI and the API: exit 2 with one clear error (never a traceback), or a typed error."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import tflow
from tflow import Receiver, tasks
from tflow.channels import receiver_part as kv_part
from tflow.channels.weights import part as weights_part
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import (
    ChannelError,
    CheckpointError,
    DataError,
    DeviceError,
    ModelLoadError,
    OutputError,
    QueryError,
    RecipeError,
    TargetError,
    TflowError,
)
from tflow.evaluation.sharded import eval_trainer
from tflow.io import read_safetensors, writable_dir, writable_file
from tflow.lora.delta import LoRADelta
from tflow.training import checkpoint
from tflow.training.data import load_splits
from tflow.training.loop import train as tflow_train

runner = CliRunner()


class Armed:
    """Unpickling this creates the file at `path`: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@dataclass
class World:
    """A tiny recipe, its team, and every broken file the cases point at, under `tmp`."""

    tmp: Path
    recipe: str
    team: tflow.Team

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, recipe=self.recipe)

    def recipe_with(self, *overrides: str):
        return load_recipe(self.recipe, [self.fill(o) for o in overrides])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("bad")
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    recipe = {
        "model": {"path": f"{tmp}/model", "device": "cpu", "tiny": tiny},
        "senders": [{"name": "reader", "role": "Read."}],
        "receiver": {"name": "executor"},
        "generator": {"kind": "mlp", "rank": 2, "d_model": 16, "depth": 1, "heads": 2},
        "data": {"task": "relay", "relay": {"n_train": 16, "n_test": 4}},
        "train": {"max_steps": 2, "batch_size": 4, "val_every": 1, "accelerator": "cpu", "devices": 1,
                  "out_dir": f"{tmp}/out"},
        "generate": {"max_new_tokens": 2, "message_tokens": 2},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    team = tflow.load(tmp / "recipe.yaml")  # builds the tiny model folder
    shutil.copytree(tmp / "model", tmp / "notemplate")
    (tmp / "notemplate" / "chat_template.jinja").unlink()
    (tmp / "empty_model").mkdir()
    ckpt = tmp / "ckpt"
    good = weights_part.save(team.receiver.generator, ckpt / "good").read_bytes()
    other = tflow.load(tmp / "recipe.yaml", overrides=[f"model.path={tmp}/other", "model.tiny.hidden_size=64",
                                                       "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2"])
    weights_part.save(other.receiver.generator, ckpt / "other")
    for name, data in [("truncated", good[: len(good) // 2]), ("corrupted", b"\xff" * 16 + good[16:]),
                       ("pickle", pickle.dumps({"weights": Armed(tmp / "MARKER")}))]:
        (ckpt / name).mkdir()
        (ckpt / name / weights_part.GENERATOR_FILE).write_bytes(data)
    torch.save({"weights": Armed(tmp / "MARKER")}, ckpt / "generator.pt")
    (ckpt / "empty").mkdir()
    kv_part.save(team.receiver.kv_lora, ckpt / "kvonly", "kv", "kv")
    (ckpt / "delta").mkdir()
    LoRADelta({"m": (torch.zeros(1, 1, 2), torch.zeros(1, 2, 1))}).save(ckpt / "delta" / weights_part.GENERATOR_FILE)
    (tmp / "file").write_text("a regular file, in the way of any folder below it")
    (tmp / "broken.yaml").write_text("model:\n  path: x\nsenders:\n  - name: a\n   role: b\n")
    (tmp / "list.yaml").write_text("- model\n- senders\n")
    (tmp / "no_answer.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "reply": "4"}) + "\n"
                                                 for i in range(4)))
    (tmp / "ok.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 4"}) + "\n"
                                          for i in range(4)))
    return World(tmp, str(tmp / "recipe.yaml"), team)


@dataclass(frozen=True)
class Case:
    """One bad input: CLI arguments, the API call that meets the same problem, what both must say."""

    id: str
    cli: tuple[str, ...]
    api: Callable[[World], object]
    error: type[TflowError]
    message: str
    cli_message: str | None = None  # where the CLI finds the problem through another check first


def ask(*args: str) -> tuple[str, ...]:
    return ("ask", "{recipe}", *args)


def validate(*overrides: str) -> tuple[str, ...]:
    return ("validate", "{recipe}", *overrides)


def communicate(query: str, **settings):
    return lambda w: w.team.communicate(query, channel=settings.pop("channel", "none"), **settings)


def load(*overrides: str, checkpoint: str | None = None):
    return lambda w: tflow.load(w.recipe_with(*overrides), w.fill(checkpoint) if checkpoint else None)


def recipe(*overrides: str):
    return lambda w: w.recipe_with(*overrides)


def train(recipe, **options):
    return tflow_train(recipe, progress=False, **options)


NOT_SAFETENSORS = "is not a readable safetensors file"
LONG = "code " * 600

CASES = [
    Case("misspelled_key", validate("train.max_stepz=3"), recipe("train.max_stepz=3"), RecipeError,
         "train.max_stepz: unknown key (did you mean max_steps?)"),
    Case("unknown_section", validate("modle.path=x"), recipe("modle.path=x"), RecipeError,
         "modle: unknown key (did you mean model?)"),
    Case("wrong_type_int", validate("train.max_steps=abc"), recipe("train.max_steps=abc"), RecipeError,
         "train.max_steps: expected an integer, got 'abc'"),
    Case("wrong_type_list", validate("generator.targets=q_proj"), recipe("generator.targets=q_proj"),
         RecipeError, "generator.targets: expected a list, got 'q_proj'"),
    Case("wrong_type_section", validate("train=5"), recipe("train=5"), RecipeError,
         "train: expected a section (a mapping of keys), got 5"),
    Case("unknown_generator_kind", validate("generator.kind=lstm"), recipe("generator.kind=lstm"), RecipeError,
         "generator.kind: must be one of param_tokens, mlp, basis, perceiver, got 'lstm'"),
    Case("zero_rank", validate("generator.rank=0"), recipe("generator.rank=0"), RecipeError,
         "generator.rank: must be > 0, got 0"),
    Case("negative_rank", validate("generator.rank=-2"), recipe("generator.rank=-2"), RecipeError,
         "generator.rank: must be > 0, got -2"),
    Case("several_problems", validate("train.lr=-1", "generator.rank=0"), recipe("train.lr=-1", "generator.rank=0"),
         RecipeError, "generator.rank: must be > 0, got 0"),
    Case("override_without_value", validate("train.max_steps"), recipe("train.max_steps"), RecipeError,
         "train.max_steps: override needs key=value, got 'train.max_steps'"),
    Case("override_unparsable_value", validate("generator.targets=[q_proj,"), recipe("generator.targets=[q_proj,"),
         RecipeError, "generator.targets: cannot parse value '[q_proj,'"),
    Case("override_index_out_of_range", validate("senders.3.role=x"), recipe("senders.3.role=x"), RecipeError,
         "senders.3.role: index 3 out of range (senders has 1 items)"),
    Case("yaml_syntax_error", ("validate", "{tmp}/broken.yaml"), lambda w: load_recipe(w.tmp / "broken.yaml"),
         RecipeError, "{tmp}/broken.yaml: line 5: invalid YAML"),
    Case("recipe_not_a_mapping", ("validate", "{tmp}/list.yaml"), lambda w: load_recipe(w.tmp / "list.yaml"),
         RecipeError, "a recipe must be a mapping of sections (model, senders, ...), got a list"),
    Case("recipe_file_missing", ("validate", "{tmp}/nowhere.yaml"), lambda w: load_recipe(w.tmp / "nowhere.yaml"),
         RecipeError, "recipe file not found: {tmp}/nowhere.yaml"),
    Case("unknown_target_module", ask("hi", "--channel", "none", "--set", "generator.targets=[qkv_proj]"),
         load("generator.targets=[qkv_proj]"), TargetError,
         "target modules ['qkv_proj'] do not exist in this Qwen3 model (Qwen3ForCausalLM; qkv_proj is a Phi-3 "
         "kind); its linear modules are: q_proj"),
    Case("layer_out_of_range", ask("hi", "--channel", "none", "--set", "generator.layers=[4]"),
         load("generator.layers=[4]"), TargetError, "layers [4] not in the model's 0..0"),
    Case("model_folder_missing", ask("hi", "--channel", "none", "--set", "model.path={tmp}/nowhere",
                                     "--set", "model.tiny=null"),
         load("model.path={tmp}/nowhere", "model.tiny=null"), RecipeError,
         "model.path: folder not found: {tmp}/nowhere"),
    Case("model_folder_without_weights", ask("hi", "--channel", "none", "--set", "model.path={tmp}/empty_model"),
         load("model.path={tmp}/empty_model"), ModelLoadError, "model.path: cannot load '{tmp}/empty_model'"),
    Case("model_hub_id_not_cached", ask("hi", "--channel", "none", "--set", "model.path=nobody/no-such-model",
                                        "--set", "model.tiny=null"),
         load("model.path=nobody/no-such-model", "model.tiny=null"), ModelLoadError,
         "downloads are off"),
    Case("tiny_model_at_a_hub_id", ask("hi", "--channel", "none", "--set", "model.path=nobody/tiny-model"),
         load("model.path=nobody/tiny-model"), ModelLoadError,
         "model.path: 'nobody/tiny-model' looks like a hub id, but model.tiny builds a random model there; give a "
         "local folder such as ./models/tiny"),
    Case("tokenizer_without_chat_template", ask("hi", "--channel", "none", "--set", "model.path={tmp}/notemplate"),
         load("model.path={tmp}/notemplate"), ModelLoadError, "has no chat template; use a chat/instruct model"),
    Case("checkpoint_of_another_receiver", ask("hi", "--checkpoint", "{tmp}/ckpt/other"),
         load(checkpoint="{tmp}/ckpt/other"), CheckpointError, "was trained for another receiver (hidden_size"),
    Case("checkpoint_truncated", ask("hi", "--checkpoint", "{tmp}/ckpt/truncated"),
         load(checkpoint="{tmp}/ckpt/truncated"), CheckpointError, NOT_SAFETENSORS),
    Case("checkpoint_corrupted", ask("hi", "--checkpoint", "{tmp}/ckpt/corrupted"),
         load(checkpoint="{tmp}/ckpt/corrupted"), CheckpointError, NOT_SAFETENSORS),
    Case("checkpoint_is_a_pickle", ask("hi", "--checkpoint", "{tmp}/ckpt/pickle"),
         load(checkpoint="{tmp}/ckpt/pickle"), CheckpointError, NOT_SAFETENSORS),
    Case("checkpoint_is_torch_save", ask("hi", "--checkpoint", "{tmp}/ckpt/generator.pt"),
         load(checkpoint="{tmp}/ckpt/generator.pt"), CheckpointError, NOT_SAFETENSORS),
    Case("checkpoint_is_a_delta", ask("hi", "--checkpoint", "{tmp}/ckpt/delta"),
         load(checkpoint="{tmp}/ckpt/delta"), CheckpointError, "not a tflow generator checkpoint"),
    Case("checkpoint_folder_missing", ask("hi", "--checkpoint", "{tmp}/ckpt/nowhere"),
         load(checkpoint="{tmp}/ckpt/nowhere"), CheckpointError,
         "checkpoint {tmp}/ckpt/nowhere does not exist; pass the train.out_dir of a finished run"),
    Case("checkpoint_folder_empty", ask("hi", "--checkpoint", "{tmp}/ckpt/empty"),
         load(checkpoint="{tmp}/ckpt/empty"), CheckpointError, "holds no trained part"),
    Case("resume_without_checkpoint", ("train", "{recipe}", "train.out_dir={tmp}/fresh", "--resume"),
         lambda w: train(w.recipe_with("train.out_dir={tmp}/fresh"), resume=True), CheckpointError,
         "--resume: {tmp}/fresh/lightning/last.ckpt does not exist"),
    Case("empty_query", ask("", "--channel", "none"), communicate(""), QueryError,
         "every query must be a non-empty string", cli_message="the question must not be empty"),
    Case("blank_query", ask(" \n ", "--channel", "none"), communicate(" \n "), QueryError,
         "every query must be a non-empty string", cli_message="the question must not be empty"),
    Case("query_longer_than_context", ask(LONG, "--channel", "none"), communicate(LONG), QueryError,
         "new tokens exceeds the model's context of 512; shorten the query or lower max_new_tokens"),
    Case("zero_max_new_tokens", ask("hi", "--channel", "none", "--set", "generate.max_new_tokens=0"),
         communicate("hi", max_new_tokens=0), QueryError, "max_new_tokens must be > 0, got 0",
         cli_message="generate.max_new_tokens: must be > 0, got 0"),
    Case("negative_max_new_tokens", ask("hi", "--channel", "none", "--set", "generate.max_new_tokens=-3"),
         communicate("hi", max_new_tokens=-3), QueryError, "max_new_tokens must be > 0, got -3",
         cli_message="generate.max_new_tokens: must be > 0, got -3"),
    Case("unknown_channel", ask("hi", "--channel", "smoke"), communicate("hi", channel="smoke"), ChannelError,
         "unknown channel 'smoke'; choose one of: none, text, weights"),
    Case("weights_without_generator", ask("hi"),
         lambda w: tflow.communicate(w.team.senders, Receiver(w.team.receiver.model, w.team.receiver.tokenizer), "hi"),
         ChannelError, "the weights channel needs a generator on the receiver",
         cli_message="the weights channel needs a checkpoint with its generator: pass --checkpoint DIR"),
    Case("negative_latent_steps", ask("hi", "--channel", "kv", "--set", "kv.latent_steps=-1"),
         communicate("hi", channel="kv", latent_steps=-1), QueryError, "latent_steps must be an integer >= 0, got -1",
         cli_message="kv.latent_steps: must be >= 0, got -1"),
    Case("kv_on_another_backbone", ask("hi", "--channel", "kv", "--set", "senders.0.model={{path: {tmp}/other}}"),
         lambda w: tflow.load(w.recipe_with("senders.0.model={{path: {tmp}/other}}")).communicate("hi", channel="kv"),
         ChannelError, "sender 'reader' has its own: drop senders.0.model (and receiver.model) from the recipe"),
    Case("latent_without_links", ask("hi", "--channel", "latent"),
         lambda w: tflow.communicate(w.team.senders, Receiver(w.team.receiver.model, w.team.receiver.tokenizer), "hi",
                                     channel="latent"),
         ChannelError, "the latent channel needs trained links on the receiver",
         cli_message="the latent channel needs a checkpoint with its latent links: pass --checkpoint DIR"),
    Case("checkpoint_of_another_channel", ask("hi", "--checkpoint", "{tmp}/ckpt/kvonly"),
         lambda w: checkpoint.require_parts(["weights"], w.tmp / "ckpt" / "kvonly"), CheckpointError,
         "{tmp}/ckpt/kvonly has no weights part (generator.safetensors); train it with "
         "`tflow train RECIPE train.channel=weights"),
    Case("part_file_of_another_channel",
         ask("hi", "--channel", "latent", "--checkpoint", "{tmp}/ckpt/good/generator.safetensors"),
         lambda w: kv_part.load(w.team.receiver.kv_lora, w.tmp / "ckpt" / "good" / weights_part.GENERATOR_FILE, "kv"),
         CheckpointError, "holds the weights channel's part, not the kv channel's",
         cli_message="generator.safetensors has no latent part (latent.safetensors); train it with"),
    Case("bad_context_option", ask("hi", "--channel", "none", "--context", "nobody=a document"),
         communicate("hi", contexts=[{}, {}]), QueryError, "got 2 contexts for 1 queries",
         cli_message="--context names unknown sender(s) ['nobody']"),
    Case("unknown_task", ("eval", "{recipe}", "--channels", "none", "--task", "gsm9k"), lambda w: tasks.get("gsm9k"),
         DataError, "unknown task 'gsm9k'; available: gsm8k"),
    Case("unknown_task_in_recipe", validate("data.task=gsm9k"), recipe("data.task=gsm9k"), RecipeError,
         "data.task: unknown task 'gsm9k' (did you mean gsm8k?)"),
    Case("dataset_missing_field", ("train", "{recipe}", "data.task=gsm8k", "data.source={tmp}/no_answer.jsonl"),
         lambda w: load_splits(w.recipe_with("data.task=gsm8k", "data.source={tmp}/no_answer.jsonl")), DataError,
         "{tmp}/no_answer.jsonl: missing field 'answer' (column 'answer'); columns: ['question', 'reply']"),
    Case("dataset_missing_context_column",
         ("train", "{recipe}", "data.task=gsm8k", "data.source={tmp}/ok.jsonl", "data.fields.context.reader=doc"),
         lambda w: load_splits(w.recipe_with("data.task=gsm8k", "data.source={tmp}/ok.jsonl",
                                             "data.fields.context.reader=doc")),
         DataError, "data.fields.context: column(s) ['doc'] not in the dataset"),
    Case("distill_without_contexts",
         ("train", "{recipe}", "data.task=gsm8k", "data.source={tmp}/ok.jsonl", "train.objective=distill"),
         lambda w: train(w.recipe_with("data.task=gsm8k", "data.source={tmp}/ok.jsonl", "train.objective=distill")),
         RecipeError, "train.objective: distill learns from a context teacher, which reads the senders' private "
         "contexts, but no sender holds any in this data; set train.teacher=text, give the senders contexts "
         "(data.fields.context), or use train.objective=ce"),
    Case("teacher_checkpoint_missing",
         ("train", "{recipe}", "train.objective=distill", "train.teacher_checkpoint={tmp}/nowhere"),
         lambda w: train(w.recipe_with("train.objective=distill", "train.teacher_checkpoint={tmp}/nowhere")),
         CheckpointError, "train.teacher_checkpoint: {tmp}/nowhere does not exist; train it with `tflow train RECIPE "
         "train.channel=context train.out_dir={tmp}/nowhere`"),
    Case("teacher_checkpoint_without_the_control",
         ("train", "{recipe}", "train.objective=distill", "train.teacher_checkpoint={tmp}/ckpt/good"),
         lambda w: train(w.recipe_with("train.objective=distill", "train.teacher_checkpoint={tmp}/ckpt/good")),
         CheckpointError, "train.teacher_checkpoint: {tmp}/ckpt/good holds no context control "
         "(context/adapter_model.safetensors)"),
    Case("perceiver_zero_rank", ("train", "{recipe}", "generator.kind=perceiver", "generator.rank=0"),
         recipe("generator.kind=perceiver", "generator.rank=0"), RecipeError, "generator.rank: must be > 0, got 0"),
    Case("perceiver_target_the_family_lacks",
         ("train", "{recipe}", "generator.kind=perceiver", "generator.targets=[qkv_proj]"),
         lambda w: train(w.recipe_with("generator.kind=perceiver", "generator.targets=[qkv_proj]")), TargetError,
         "target modules ['qkv_proj'] do not exist in this Qwen3 model"),
    Case("eval_out_not_writable", ("eval", "{recipe}", "--channels", "none", "--out", "{tmp}/file/report"),
         lambda w: writable_dir(w.tmp / "file" / "report"), OutputError,
         "cannot write to {tmp}/file/report: Not a directory; choose a folder you can write to"),
    Case("eval_unknown_strategy", ("eval", "{recipe}", "--channels", "none", "--strategy", "dpp"),
         lambda w: eval_trainer("dpp"), DeviceError, "unknown strategy 'dpp'; Lightning knows: auto, ddp, ddp_spawn"),
    Case("eval_training_only_strategy", ("eval", "{recipe}", "--channels", "none", "--strategy", "fsdp"),
         lambda w: eval_trainer("fsdp"), DeviceError, "eval shards its queries with strategy ddp or auto, not 'fsdp'"),
    Case("eval_more_devices_than_cores", ("eval", "{recipe}", "--channels", "none", "--devices", "10000"),
         lambda w: eval_trainer(devices=10000, accelerator="cpu"), DeviceError,
         "--devices 10000 on cpu: this machine has "),
    Case("eval_no_nodes", ("eval", "{recipe}", "--channels", "none", "--strategy", "ddp", "--num-nodes", "0"),
         lambda w: eval_trainer(num_nodes=0), DeviceError, "--num-nodes must be an integer >= 1, got 0"),
    Case("eval_devices_not_a_count", ("eval", "{recipe}", "--channels", "none", "--devices", "two"),
         lambda w: eval_trainer(devices="two"), DeviceError, "--devices must be a positive integer or auto, got 'two'"),
    Case("eval_accelerator_lightning_refuses", ("eval", "{recipe}", "--channels", "none", "--devices", "2",
                                                "train.accelerator=tpu"),
         lambda w: eval_trainer(devices=2, accelerator="tpu"), DeviceError,
         "cannot run on devices=2, num_nodes=1, accelerator='tpu': "),
    Case("train_out_not_writable", ("train", "{recipe}", "train.out_dir={tmp}/file/run"),
         lambda w: train(w.recipe_with("train.out_dir={tmp}/file/run")), OutputError,
         "cannot write to {tmp}/file/run: Not a directory"),
    Case("bench_json_is_a_folder", ("bench", "--shape", "tiny", "--quick", "--json", "{tmp}"),
         lambda w: writable_file(w.tmp), OutputError,
         "cannot write to {tmp}: it is a folder; name a file in it, e.g. {tmp}/bench.json"),
    Case("bench_json_under_a_file", ("bench", "--shape", "tiny", "--quick", "--json", "{tmp}/file/bench.json"),
         lambda w: writable_file(w.tmp / "file" / "bench.json"), OutputError,
         "cannot write to {tmp}/file: it is a file, not a folder; choose a folder you can write to"),
]


def test_the_matrix_is_wide():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_exits_2_with_one_clear_error(world, case):
    result = runner.invoke(app, [world.fill(arg) for arg in case.cli])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    if len(lines) > 1:  # a RecipeError with several problems: a header, then one line per problem
        header = re.fullmatch(r"error: .+: (\d+) problems", lines[0])
        assert header and int(header[1]) == len(lines) - 1, result.stderr
        assert all(line.startswith("  ") for line in lines[1:])
    else:
        assert lines[0].startswith("error: ")
    assert world.fill(case.cli_message or case.message) in result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_raises_a_typed_error(world, case):
    with pytest.raises(case.error) as info:
        case.api(world)
    assert isinstance(info.value, TflowError)
    assert world.fill(case.message) in str(info.value)


def test_a_pickle_checkpoint_is_never_unpickled(world, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Armed(control)))
    assert control.exists()  # the payload is armed: loading it would create the marker
    marker = world.tmp / "MARKER"
    for path in [world.tmp / "ckpt" / "pickle", world.tmp / "ckpt" / "generator.pt"]:
        with pytest.raises(CheckpointError, match=NOT_SAFETENSORS):
            tflow.load(world.recipe, checkpoint=path)
        for read in (read_safetensors, LoRADelta.load):
            with pytest.raises(CheckpointError, match=NOT_SAFETENSORS):
                read(next(path.glob("*")) if path.is_dir() else path)
        assert runner.invoke(app, ["ask", world.recipe, "hi", "--checkpoint", str(path)]).exit_code == 2
    assert not marker.exists()


def test_an_unexpected_bug_still_shows_its_traceback(tmp_path):
    code = ("import tflow.config.recipe\n"
            "def bug(*args, **kwargs):\n"
            "    raise RuntimeError('a bug, not a user mistake')\n"
            "tflow.config.recipe.load_recipe = bug\n"
            "from tflow.cli import app\n"
            "app(['validate', 'any.yaml'])\n")
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug, not a user mistake" in done.stderr
