"""The distillation teacher: what it scores, and a cache that is used only where it fits."""

import shutil
from dataclasses import replace

import pytest
import torch

import tflow
from tflow.channels.context import context_turn
from tflow.config.recipe import load_recipe
from tflow.errors import CheckpointError
from tflow.tasks import Example
from tflow.training import teacher
from tflow.training.data import load_splits


def recipe(tmp, *extra):
    return load_recipe("recipes/tiny.yaml", [f"model.path={tmp}/model", f"train.out_dir={tmp}/out",
                                             f"train.teacher_cache={tmp}/cache", "data.relay.n_train=12",
                                             "data.relay.n_val=5", "train.objective=distill",
                                             "train.distill_top_k=5", "train.batch_size=4", *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    rec = recipe(tmp)
    splits = load_splits(rec)
    return tmp, rec, tflow.load(rec), splits


def prepared(setup, rec=None):
    tmp, default, team, splits = setup
    said = []
    targets = teacher.prepare(replace(team, recipe=rec or default), splits, said.append).teacher
    return targets, said


def same(a, b):
    return a.rows.keys() == b.rows.keys() and all(
        torch.equal(a.rows[k][0], b.rows[k][0]) and torch.equal(a.rows[k][1], b.rows[k][1]) for k in a.rows)


def test_the_teacher_scores_each_answer_reading_the_contexts(setup):
    tmp, rec, team, splits = setup
    targets, said = prepared(setup)
    assert len(targets.rows) == 17 and any("12/12 train answers scored" in line for line in said)
    example = splits.train[0]
    receiver, tok = team.receiver, team.receiver.tokenizer
    prompt = receiver.prompt(context_turn(splits.task.prompt(example), example.contexts))
    answer = tok([splits.task.target(example)], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
    prompt_ids = tok([prompt], add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = receiver.model(torch.tensor([prompt_ids + answer])).logits[0]
    want = logits[len(prompt_ids) - 1:-1].log_softmax(-1).topk(5, dim=-1)
    values, ids = targets.lookup([example], "cpu")[0]
    assert values.dtype == torch.float16 and ids.dtype == torch.int32 and values.shape == (len(answer), 5)
    assert torch.equal(ids.long(), want.indices)
    torch.testing.assert_close(values.float(), want.values, atol=2e-3, rtol=1e-3)
    with pytest.raises(CheckpointError, match="the teacher scored no answer"):
        targets.lookup([Example("What is the secret code of Nowhere?", "1")], "cpu")


def test_a_fitting_cache_is_read_and_not_scored_again(setup):
    first, _ = prepared(setup)
    again, said = prepared(setup)
    assert said == [] and same(first, again)


def corrupt(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 3] ^= 0xFF  # one byte of the tensors, the header left intact
    path.write_bytes(bytes(data))


def test_a_damaged_or_swapped_cache_is_reported_and_rebuilt_never_used(setup):
    tmp = setup[0]
    fresh, _ = prepared(setup)
    train_file = next((tmp / "cache").glob("train-*.safetensors"))
    val_file = next((tmp / "cache").glob("val-*.safetensors"))
    corrupt(train_file)
    rebuilt, said = prepared(setup)
    assert said[0] == f"teacher cache not used, rebuilding it: {train_file} is damaged: its tensors do not match " \
                      "their checksum"
    assert same(rebuilt, fresh)
    shutil.copyfile(val_file, train_file)  # another split's file where this split's belongs
    rebuilt, said = prepared(setup)
    assert "was made for another teacher, model, recipe, task or split (key differs)" in said[0]
    assert same(rebuilt, fresh)


def test_another_recipe_gets_another_cache_and_its_file_is_refused_here(setup):
    tmp, rec, team, splits = setup
    fresh, _ = prepared(setup)
    other = recipe(tmp, "train.distill_top_k=3")
    before = set((tmp / "cache").glob("train-*"))
    theirs, said = prepared(setup, other)
    made = set((tmp / "cache").glob("train-*")) - before
    assert len(made) == 1 and any("scored" in line for line in said)
    assert not same(theirs, fresh)
    ours = next(iter(before))
    shutil.copyfile(next(iter(made)), ours)  # the other recipe's scores under this recipe's name
    rebuilt, said = prepared(setup)
    assert "key differs" in said[0] and same(rebuilt, fresh)


def test_the_splits_are_unchanged_and_ce_needs_no_teacher(setup):
    tmp, rec, team, splits = setup
    assert teacher.prepare(replace(team, recipe=recipe(tmp, "train.objective=ce")), splits, print) is splits
    out = teacher.prepare(team, splits, lambda line: None)
    assert replace(out, teacher=None) == splits


def test_a_text_teacher_reads_the_senders_messages(setup):
    tmp, rec, team, splits = setup
    context, _ = prepared(setup)
    text, said = prepared(setup, recipe(tmp, "train.teacher=text", "generate.message_tokens=3"))
    assert any("(text): 12/12 train answers scored" in line for line in said)
    assert text.rows.keys() == context.rows.keys() and not same(text, context)
