"""Fuzzing recipes and overrides: every input gives a valid Recipe or a RecipeError, never another exception."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tflow.channels.weights.settings import GeneratorSection
from tflow.config.overrides import apply_overrides
from tflow.config.recipe import Recipe, load_recipe, recipe_model
from tflow.config.sections import (
    DataSection,
    FieldsSection,
    GenerateSection,
    RelaySection,
    TinySection,
    TrainSection,
)
from tflow.errors import RecipeError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = Path("recipes/tiny.yaml").read_text()
BASE = yaml.safe_load(TINY)
SECTIONS = [recipe_model(), TinySection, GeneratorSection, DataSection, FieldsSection, RelaySection, TrainSection,
            GenerateSection]
KEYS = sorted({name for section in SECTIONS for name in section.model_fields} | {"path", "name", "role"})
TOKENS = [":", ": ", "- ", "\n", "  ", "&a ", "*a", "<<: *a", "!!python/object/apply:os.system ['true']", "? ",
          "{", "}", "[", "]", ",", "'", '"', "#", "|", ">", "\t", "%YAML 1.1", "---", "...", "null", "~", "-1",
          "0", "1e400", ".nan", ".inf", "yes", "2020-01-01", "\\u0000", "9" * 5000, "[" * 3000]

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["auto", "mlp", "param_tokens", "relay", "gsm8k", "q_proj", "32", "~nobody/x"]))
keys = st.sampled_from(KEYS) | st.text(max_size=8) | st.integers(-2, 3)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)


def valid_or_recipe_error(make) -> Recipe | None:
    """The Recipe `make()` returns (checked to survive a YAML round trip), or None for a RecipeError."""
    try:
        recipe = make()
    except RecipeError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        return None
    assert isinstance(recipe, Recipe)
    assert load_recipe(yaml.safe_load(recipe.to_yaml())) == recipe
    return recipe


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_random_mappings(data):
    valid_or_recipe_error(lambda: load_recipe(data))


@FUZZ
@given(st.sampled_from(sorted(BASE)), st.sampled_from(KEYS), values)
def test_valid_recipe_with_one_random_value(section, key, value):
    data = {**BASE, section: {**BASE[section], key: value} if isinstance(BASE[section], dict) else value}
    valid_or_recipe_error(lambda: load_recipe(data))


def inserted(text: str, pieces: list[tuple[int, str]]) -> str:
    """`text` with each piece inserted at its position (wrapped around the text's length)."""
    for position, piece in pieces:
        at = position % (len(text) + 1)
        text = text[:at] + piece + text[at:]
    return text


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2000), st.sampled_from(TOKENS) | st.text(max_size=4)), max_size=4))
@example([(0, "\xff")])
def test_mutated_yaml_text(recipe_file, pieces):
    recipe_file.write_text(inserted(TINY, pieces), encoding="utf-8", errors="surrogatepass")
    valid_or_recipe_error(lambda: load_recipe(recipe_file))


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"\xff\xfe model: x")
@example(b"[" * 3000)
def test_random_bytes(recipe_file, data):
    recipe_file.write_bytes(data)
    valid_or_recipe_error(lambda: load_recipe(recipe_file))


key_paths = st.lists(st.sampled_from(KEYS) | st.sampled_from(["0", "1", "7", "model", "senders", "train"])
                     | st.text(max_size=5), min_size=1, max_size=4).map(".".join)
override_values = st.sampled_from(TOKENS) | st.text(max_size=10) | values.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
overrides = (st.tuples(key_paths, st.sampled_from(["=", "", "==", " = "]), override_values).map("".join)
             | st.text(max_size=20))


@FUZZ
@given(st.lists(overrides, max_size=4))
@example(["train.max_steps"])
@example(["train.max_steps=abc", "senders.0=5", "senders.0.name=x"])
@example(["model.path=~nobody/x", "model.tiny=null"])
def test_random_overrides(items):
    try:
        data = apply_overrides(BASE, items)
    except RecipeError as err:
        assert err.problems
    else:
        assert isinstance(data, dict)
    valid_or_recipe_error(lambda: load_recipe(BASE, items))
