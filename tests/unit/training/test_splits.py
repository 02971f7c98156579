"""Three disjoint splits: train, val (what training validates on) and test (read only by tflow eval)."""

import json

from typer.testing import CliRunner

from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.training.data import check_eval_split, load_splits, relay_splits, training_splits


def facts(examples):
    return {fact for ex in examples for fact in ex.meta["facts"]}


def test_relay_validates_on_its_own_split_with_no_test_fact():
    recipe = load_recipe("recipes/tiny.yaml", ["data.relay.n_train=64", "data.relay.n_val=32", "data.relay.n_test=32"])
    train, val, test = relay_splits(recipe)
    assert (len(train), len(val), len(test)) == (64, 32, 32)
    assert not facts(test) & facts(train) and not facts(test) & facts(val)
    assert {ex.question for ex in val} != {ex.question for ex in test}
    splits = load_splits(recipe)
    assert splits.val == val and splits.train == train


def test_relay_category_format_has_three_disjoint_splits_too():
    recipe = load_recipe("recipes/tiny.yaml", ["data.relay.format=category", "data.relay.n_train=64",
                                               "data.relay.n_val=16", "data.relay.n_test=16"])
    train, val, test = relay_splits(recipe)
    assert not facts(test) & (facts(train) | facts(val))


def write_checkpoint_recipe(folder, data):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(json.dumps({"data": data}))


def test_eval_refuses_a_split_the_checkpoint_trained_or_validated_on(tmp_path):
    write_checkpoint_recipe(tmp_path / "held", {"task": "gsm8k", "split": "train", "val_split": None})
    write_checkpoint_recipe(tmp_path / "val", {"task": "gsm8k", "split": "train", "val_split": "dev"})
    assert training_splits(tmp_path / "held", "gsm8k") == {"train"}
    assert training_splits(tmp_path / "val", "gsm8k") == {"train", "dev"}
    assert training_splits(tmp_path / "val", "math") == set() and training_splits(None, "gsm8k") == set()
    assert check_eval_split(tmp_path / "val", "gsm8k", "test", allow=False) is False
    assert check_eval_split(tmp_path / "val", "gsm8k", "dev", allow=True) is True
    result = CliRunner().invoke(app, ["eval", "recipes/tiny.yaml", f"model.path={tmp_path}/model", "--task", "gsm8k",
                                      "--split", "dev", "--checkpoint", str(tmp_path / "val"), "--channels", "none"])
    assert result.exit_code == 2
    assert "was trained or validated on the gsm8k split 'dev'; evaluate on a held-out split" in result.output
    assert "--on-training-split" in result.output


def test_too_few_examples_for_a_validation_split_names_the_keys(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", "data.task=null",
                                               f"data.source={data}", "data.relay=null"])
    try:
        load_splits(recipe)
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        assert "data.val_split" in str(err) and "data.val_fraction" in str(err), str(err)
    else:
        raise AssertionError("one example cannot be split")
