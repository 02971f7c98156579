"""The relay category scorer on the real SmolLM2-135M-Instruct's own replies (greedy, the receiver alone)."""

from pathlib import Path

import pytest

import tflow
from tflow.tasks import relay

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "smollm2-relay.yaml"
TASK = relay.Relay()


@pytest.fixture(scope="module")
def team():
    return tflow.load(RECIPE, overrides=[f"model.cache_dir={ROOT / 'runs' / 'models' / 'gguf'}"])


def test_the_scorer_credits_the_model_only_when_it_was_told_the_password(team):
    examples = relay.generate(8, seed=7, senders=("reader_a", "reader_b"), format="category")
    bare = [TASK.prompt(e) for e in examples]
    told = [f"The password of {e.meta['entity']} is {e.meta['password']}.\n\n{TASK.prompt(e)}" for e in examples]
    replies = {name: [r.text for r in team.communicate(queries, channel="none", max_new_tokens=16)]
               for name, queries in (("bare", bare), ("told", told))}
    for texts in replies.values():
        for text, example in zip(texts, examples, strict=True):
            named = TASK.extract(text, example)
            assert set(filter(None, named.split(", "))) <= set(example.meta["options"]), text
            assert not TASK.score(text, example) or named == example.answer, text
    right = {name: sum(map(TASK.score, texts, examples)) for name, texts in replies.items()}
    # uninformed, the model lists the options ("... is fruit, animal, metal, or color."): all wrong
    assert right["bare"] <= TASK.chance(examples[0]) * len(examples) < right["told"], replies
