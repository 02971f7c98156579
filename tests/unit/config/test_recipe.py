"""The recipe schema: defaults, every problem at once with its key path, overrides, paths, docs/recipes.md."""

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from tflow.config.overrides import apply_overrides
from tflow.config.recipe import load_recipe, recipe_model
from tflow.config.reference import reference_markdown
from tflow.errors import RecipeError

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = {"model": {"path": "Qwen/Qwen3-4B"}, "senders": [{"name": "strategist", "role": "Plan."}]}


def problems(source, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return info.value.problems


def with_(**sections):
    return {**MINIMAL, **sections}


def test_minimal_recipe_fills_defaults():
    recipe = load_recipe(MINIMAL)
    assert recipe.model.dtype == "float32" and recipe.model.device == "auto" and recipe.model.tiny is None
    assert recipe.senders[0].context is None and recipe.senders[0].model is None
    assert recipe.receiver.name == "executor"
    assert recipe.generator.kind == "param_tokens" and recipe.generator.rank == 4
    assert recipe.generator.targets is None and recipe.generator.layers is None
    assert recipe.fusion.gate_init == 1.0 and recipe.data is None
    assert recipe.train.max_steps == 200 and recipe.train.lr == 1e-3 and recipe.train.devices == "auto"
    assert recipe.generate.max_new_tokens == 64 and recipe.generate.message_tokens == 256
    assert recipe.seed == 0


def test_every_problem_is_reported_at_once_with_its_key_path():
    data = with_(senders=[{"role": "Plan."}], train={"lr": -1}, generator={"rank": 0})
    assert problems(data) == [
        "senders.0.name: field required",
        "generator.rank: must be > 0, got 0",
        "train.lr: must be > 0, got -1",
    ]


def test_messages_are_short_and_free_of_pydantic_noise():
    data = with_(model={"path": "x", "dtype": "bf16"}, train={"max_steps": 1.5, "gradient_checkpointing": "maybe"},
                 generate="fast")
    found = problems(data)
    assert found == [
        "model.dtype: must be one of float32, bfloat16, float16, got 'bf16' (did you mean bfloat16?)",
        "train.max_steps: expected an integer, got 1.5",
        "train.gradient_checkpointing: expected true or false, got 'maybe'",
        "generate: expected a section (a mapping of keys), got 'fast'",
    ]
    assert not any("pydantic" in p or "http" in p or "Input should" in p for p in found)


def test_unknown_key_suggests_the_closest_one():
    assert problems(with_(train={"max_stepz": 3})) == ["train.max_stepz: unknown key (did you mean max_steps?)"]
    assert problems(with_(senders=[{"name": "a", "rol": "x"}])) == [
        "senders.0.role: field required",
        "senders.0.rol: unknown key (did you mean role?)",
    ]


def test_unknown_key_without_a_close_match_lists_the_valid_ones():
    (message,) = problems(with_(fusion={"zzz": 1}))
    assert message == "fusion.zzz: unknown key (expected one of: gate_init)"


def test_overrides_parse_values_as_yaml():
    recipe = load_recipe(MINIMAL, [
        "train.max_steps=40", "train.lr=3e-4", "train.gradient_checkpointing=true",
        "generator.targets=[q_proj,v_proj]", "receiver.system_prompt=Answer briefly.",
        "train.grad_clip=null", "train.devices=2", "senders.0.role='Be brief: one word.'",
    ])
    assert recipe.train.max_steps == 40 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.lr == 3e-4
    assert recipe.train.gradient_checkpointing is True
    assert recipe.generator.targets == ["q_proj", "v_proj"]
    assert recipe.receiver.system_prompt == "Answer briefly."
    assert recipe.train.grad_clip is None and recipe.train.devices == 2
    assert recipe.senders[0].role == "Be brief: one word."


def test_unquoted_override_text_with_a_colon_is_yaml_mapping():
    assert problems(MINIMAL, ["senders.0.role=Be brief: one word."]) == [
        "senders.0.role: expected a string, got {Be brief: one word.} (quote it to keep it text)"
    ]


def test_overrides_go_through_the_schema():
    assert problems(MINIMAL, ["train.max_steps=abc", "generator.ranks=2"]) == [
        "generator.ranks: unknown key (did you mean rank?)",
        "train.max_steps: expected an integer, got 'abc'",
    ]


def test_apply_overrides_returns_a_new_dict():
    data = {"train": {"lr": 1}, "senders": [{"name": "a"}]}
    out = apply_overrides(data, ["train.lr=2", "senders.0.name=b", "senders.1.name=c", "data.task=relay"])
    assert out == {"train": {"lr": 2}, "senders": [{"name": "b"}, {"name": "c"}], "data": {"task": "relay"}}
    assert data == {"train": {"lr": 1}, "senders": [{"name": "a"}]}


def test_malformed_overrides_each_get_a_message():
    with pytest.raises(RecipeError) as info:
        apply_overrides({"train": {"lr": 1}, "senders": []}, [
            "train.max_steps", "=5", "a..b=1", "train.lr=", "senders.3.name=x", "senders.name=x",
            "train.lr.x=1", "train.lr=[1,",
        ])
    assert info.value.problems == [
        "train.max_steps: override needs key=value, got 'train.max_steps'",
        "override: override needs key=value, got '=5'",
        "a..b: empty key segment in override 'a..b=1'",
        "train.lr: override needs key=value, got 'train.lr=' (write train.lr=null for none)",
        "senders.3.name: index 3 out of range (senders has 0 items)",
        "senders.name: senders is a list; index it, e.g. senders.0.name",
        "train.lr.x: train.lr is 1, not a section",
        "train.lr: cannot parse value '[1,' (expected the node content, but found '<stream end>'); "
        "quote it to pass a string",
    ]


def test_override_problems_are_reported_with_schema_problems():
    assert problems(with_(train={"lr": 0}), ["train.max_steps"]) == [
        "train.max_steps: override needs key=value, got 'train.max_steps'",
        "train.lr: must be > 0, got 0",
    ]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  path: x\nsenders:\n  - name: a\n   role: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: line 5: ")


def test_missing_file(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"recipe file not found: {tmp_path / 'nope.yaml'}"]


@pytest.mark.parametrize("text, got", [("", "an empty file"), ("- a\n- b\n", "a list"), ("3\n", "a int")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert problems(path) == [f"a recipe must be a mapping of sections (model, senders, ...), got {got}"]


def test_recipe_file_errors_carry_the_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_(train={"lr": -1})))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: train.lr: must be > 0, got -1"


def test_duplicate_sender_names_are_reported_beside_other_problems():
    senders = [{"name": "a", "role": "x"}, {"name": "a", "role": "y"}, {"name": "executor", "role": "z"}]
    assert problems(with_(senders=senders, seed="x")) == [
        "seed: expected an integer, got 'x'",
        "senders.1.name: duplicate sender name 'a' (also senders.0.name)",
        "senders.2.name: 'executor' is the receiver's name; give the sender another name",
    ]
    assert problems(with_(senders=senders[:2])) == ["senders.1.name: duplicate sender name 'a' (also senders.0.name)"]


def test_recipe_built_in_python_checks_names_too():
    with pytest.raises(ValueError, match="duplicate sender name"):
        recipe_model()(model={"path": "x"}, senders=[{"name": "a", "role": "x"}, {"name": "a", "role": "y"}])


def test_senders_must_not_be_empty():
    assert problems(with_(senders=[])) == ["senders: must not be empty"]


def test_generator_heads_must_divide_d_model():
    assert problems(with_(generator={"d_model": 64, "heads": 5})) == ["generator.heads: must divide d_model 64, got 5"]
    assert load_recipe(with_(generator={"d_model": 64, "heads": 8})).generator.heads == 8


def test_generator_lists():
    assert problems(with_(generator={"targets": [], "layers": [0, 0]})) == [
        "generator.targets: must not be empty",
        "generator.layers: lists 0 more than once",
    ]
    assert problems(with_(generator={"layers": [-1]})) == ["generator.layers: must be layer indices >= 0, got [-1]"]


def test_bounds_on_optional_and_open_intervals():
    data = with_(generator={"dropout": 1.0, "max_delta_norm": 0},
                 generate={"top_p": 0, "num_beams": 0},
                 data={"task": "relay", "val_fraction": 1, "limit": 0})
    assert problems(data) == [
        "generator.dropout: must be < 1, got 1",
        "generator.max_delta_norm: must be > 0, got 0",
        "data.val_fraction: must be < 1, got 1",
        "data.limit: must be > 0, got 0",
        "generate.top_p: must be > 0, got 0",
        "generate.num_beams: must be >= 1, got 0",
    ]


def test_devices_and_precision_as_yaml_writes_them():
    recipe = load_recipe(with_(train={"devices": 4, "precision": 32}))
    assert recipe.train.devices == 4 and recipe.train.precision == "32"
    assert problems(with_(train={"devices": 0})) == ["train.devices: expected a positive integer or 'auto', got 0"]
    assert problems(with_(train={"devices": True})) == [
        "train.devices: expected a positive integer or 'auto', got true"
    ]


def test_model_device_names():
    assert load_recipe(with_(model={"path": "x", "device": "cuda:1"})).model.device == "cuda:1"
    assert problems(with_(model={"path": "x", "device": "gpu"})) == [
        "model.device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"
    ]


def test_local_model_path_must_exist_unless_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert problems(with_(model={"path": "./weights"})) == [
        "model.path: folder not found: ./weights (set model.tiny to build a tiny model there)"
    ]
    sender = {"name": "a", "role": "x", "model": {"path": "/no/such/dir"}}
    assert problems(with_(senders=[sender])) == [
        "senders.0.model.path: folder not found: /no/such/dir (set senders.0.model.tiny to build a tiny model there)"
    ]
    assert load_recipe(with_(model={"path": "./weights", "tiny": {}})).model.tiny.hidden_size == 64
    (tmp_path / "weights").mkdir()
    assert load_recipe(with_(model={"path": "./weights"})).model.path == "./weights"


def test_tiny_model_shape_checks():
    tiny = {"hidden_size": 64, "num_heads": 6, "num_kv_heads": 4}
    assert problems(with_(model={"path": "x", "tiny": tiny})) == [
        "model.tiny.num_heads: must divide hidden_size 64, got 6"
    ]
    tiny = {"num_heads": 4, "num_kv_heads": 3}
    assert problems(with_(model={"path": "x", "tiny": tiny})) == [
        "model.tiny.num_kv_heads: must divide num_heads 4, got 3"
    ]


def test_local_data_source_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = with_(data={"task": "gsm8k", "source": "train.jsonl"})
    assert problems(data) == ["data.source: file not found: train.jsonl"]
    (tmp_path / "train.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    assert load_recipe(data).data.source == "train.jsonl"
    assert load_recipe(with_(data={"source": "openai/gsm8k", "config": "main"})).data.config == "main"


def test_data_needs_task_or_source():
    assert problems(with_(data={"split": "test"})) == [
        "data: set task (e.g. gsm8k, relay) or source (a hub id or local file)"
    ]


def test_context_fields_name_existing_senders():
    data = with_(data={"task": "relay", "fields": {"context": {"strategist": "doc", "bob": "notes"}}})
    assert problems(data) == ["data.fields.context.bob: no sender named 'bob' (senders: strategist)"]


def test_resolved_recipe_round_trips_through_yaml():
    recipe = load_recipe(with_(data={"task": "relay", "relay": {"n_train": 10}}), ["generator.layers=[0,1]"])
    text = recipe.to_yaml()
    assert yaml.safe_load(text) == recipe.to_dict()
    assert load_recipe(yaml.safe_load(text)) == recipe
    assert recipe.to_dict()["train"]["max_steps"] == 200


def test_every_field_is_documented():
    sections = {recipe_model()}
    while sections:
        section = sections.pop()
        assert section.__doc__
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no docstring"
            sections.update(_sections_in(field.annotation))


def _sections_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return set().union(*map(_sections_in, get_args(annotation)))


def test_docs_match_the_schema():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert doc == reference_markdown(), "docs/recipes.md is stale: run python -m tflow.config.reference > docs/recipes.md"


def test_docs_cover_every_key():
    doc = reference_markdown()
    for key in ["model.tiny.num_kv_heads", "senders.N.role", "receiver.system_prompt", "generator.max_delta_norm",
                "fusion.gate_init", "data.fields.context", "data.relay.n_test", "train.max_length",
                "generate.message_tokens", "`seed`"]:
        assert key in doc


SHIPPED = sorted((ROOT / "recipes").glob("**/*.yaml"))


@pytest.mark.skipif(not SHIPPED, reason="no recipes shipped in recipes/ yet")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in recipes resolve against the working directory
    load_recipe(path)


def test_home_folder_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "qwen").mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = load_recipe(with_(data={"source": "~/train.jsonl"}),
                         ["model.path=~/qwen", "train.out_dir=~/runs"])
    assert recipe.model.path == str(tmp_path / "qwen")
    assert recipe.data.source == str(tmp_path / "train.jsonl")
    assert recipe.train.out_dir == str(tmp_path / "runs")
