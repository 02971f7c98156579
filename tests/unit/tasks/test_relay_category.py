"""Relay's category format: the answer, a password's category, is in no sender's document."""

import re

import pytest

from tflow import tasks
from tflow.errors import DataError
from tflow.tasks import Example, relay

RELAY = tasks.get("relay")
SENDERS = ("reader_a", "reader_b")


def words(text):
    return {w.casefold() for w in re.findall(r"[A-Za-z0-9]+", text)}


def test_category_examples_are_seeded_and_ask_with_shuffled_options():
    first = relay.generate(200, seed=3, senders=SENDERS, format="category")
    assert first == relay.generate(200, seed=3, senders=SENDERS, format="category")
    assert first != relay.generate(200, seed=4, senders=SENDERS, format="category")
    for example in first:
        options, entity = example.meta["options"], example.meta["entity"]
        assert sorted(options) == sorted(relay.CATEGORIES) and example.answer in options
        assert example.question == (f"Which kind of word is the password of {entity}: "
                                    f"{options[0]}, {options[1]}, {options[2]} or {options[3]}?")
        assert RELAY.chance(example) == 0.25
        assert RELAY.prompt(example).endswith("?\n\nAnswer in one sentence.")
    assert len({tuple(e.meta["options"]) for e in first}) > 12  # the order is shuffled per example
    assert {e.answer for e in first} == set(relay.CATEGORIES)
    assert {e.meta["holder"] for e in first} == set(SENDERS)


def test_no_document_names_a_category_and_only_the_holder_states_the_password():
    for example in relay.generate(300, seed=0, senders=SENDERS, format="category", facts=4):
        entity, holder, password = example.meta["entity"], example.meta["holder"], example.meta["password"]
        (other,) = set(SENDERS) - {holder}
        assert password in relay.CATEGORIES[example.answer]
        for doc in example.contexts.values():
            assert not words(doc) & set(relay.CATEGORY_NAMES)  # the gold, or any option, is never a word
            assert doc.count(". ") == 3  # 4 facts each
        asked = f"The password of {entity} is {password}."
        assert asked in example.contexts[holder] and asked not in example.contexts[other]
        assert f"The secret code of {entity} is " in example.contexts[other]
        # another city's password of another category: copying a word of the documents is wrong
        elsewhere = {v for e, v in example.meta["facts"] if e != entity}
        assert any(v in relay.CATEGORIES[c] for v in elsewhere for c in relay.CATEGORIES if c != example.answer)
        target = RELAY.target(example)
        assert target == f"The password of {entity} is {'an' if example.answer == 'animal' else 'a'} {example.answer}."
        assert password not in words(target) and RELAY.score(target, example)


def test_category_splits_keep_test_facts_and_questions_out_of_training():
    train, test = relay.split(0, n_train=4000, n_test=200, senders=SENDERS, format="category", facts=4)
    assert len(train) == 4000 and len(test) == 200
    train_facts = {fact for e in train for fact in e.meta["facts"]}
    assert not {fact for e in test for fact in e.meta["facts"]} & train_facts
    assert not {(e.meta["entity"], e.meta["password"]) for e in test} & train_facts


def test_category_words_are_of_one_category_and_in_the_corpus():
    every = [w for ws in relay.CATEGORIES.values() for w in ws]
    assert len(every) == len(set(every)) == 64
    assert not set(every) & set(relay.CATEGORY_NAMES)
    corpus = words(" ".join(relay.corpus("category")))
    assert set(every) | set(relay.CATEGORIES) | {"which", "kind", "or", "sentence", "an"} <= corpus
    assert relay.corpus("documents") == relay.corpus()  # the other formats' corpus is as before


def test_the_other_formats_draw_what_they_drew_before_the_category_format():
    (toy,) = relay.generate(1, seed=0, senders=SENDERS)
    assert (toy.question, toy.answer, toy.contexts) == (
        "What is the password of Helsinki?", "crayon",
        {"reader_b": "The password of Helsinki is crayon.", "reader_a": "The password of Riga is camera."})
    (doc,) = relay.generate(1, seed=0, senders=SENDERS, format="documents", facts=2)
    assert (doc.question, doc.answer, doc.contexts) == (
        "What is the password of Helsinki?", "helmet",
        {"reader_a": "The password of Helsinki is helmet. The password of Quito is pebble.",
         "reader_b": "The password of Prague is ginger. The secret code of Helsinki is 809."})


@pytest.mark.parametrize(("options", "message"), [
    ({"kinds": ("code",)}, "the relay category format asks about passwords; kinds ['code'] lack 'password'"),
    ({"facts": 17}, "relay facts per document must be 2 to 16, got 17"),
    ({"senders": ("a", "b", "c"), "facts": 11}, "3 senders with 11 facts each need more than 32 cities"),
])
def test_bad_category_options(options, message):
    with pytest.raises(DataError, match=re.escape(message)):
        relay.generate(1, seed=0, **{"format": "category", **options})


OSLO = Example(
    "Which kind of word is the password of Oslo: metal, fruit, animal or color?", "fruit",
    meta={"format": "category", "kind": "password", "entity": "Oslo", "password": "mango",
          "options": ["metal", "fruit", "animal", "color"], "facts": [("Oslo", "mango"), ("Rome", "tiger")]},
)

# SmolLM2-135M-Instruct's greedy and sampled replies to category questions (its cities and
# passwords renamed to Oslo's), then replies in the style of Qwen instruct models
CATEGORY_REPLIES = [
    ("The password of Oslo is fruit.", "fruit", True),
    ("The password of Oslo is indeed a fruit.", "fruit", True),
    ("The password of Oslo is mango, which is a fruit.", "fruit", True),
    ('The answer is "Fruit."', "fruit", True),
    ("The password of Oslo is a metal.", "metal", False),
    ('The answer is "animal"', "animal", False),
    ("The password of Oslo is fruit, metal, animal, or color.", "fruit, metal, animal, color", False),
    ("The password of Oslo is a combination of fruit, metal, and color.", "fruit, metal, color", False),
    ("The password of Oslo is metal, which is a metal.", "metal", False),
    ('The password of Oslo is a combination of the words "coconut" and "lighthouse."', "", False),
    ("The password of Oslo is not a word, but rather a flight of a snail", "", False),
    ("This puzzle has a distinct flavor of creative thinking!", "", False),
    ("Fruit", "fruit", True),
    ("fruit.", "fruit", True),
    ("**Fruit**", "fruit", True),
    ("It's a fruit.", "fruit", True),
    ("FRUIT", "fruit", True),
    ("The password of Oslo is a kind of fruit.", "fruit", True),
    ('The password "mango" is a tropical fruit.', "fruit", True),
    ("Mango belongs to the fruits.", "fruit", True),
    ("<think>Mango could be a color or a fruit; it is a fruit, not a metal.</think>\n\nThe password of Oslo is a fruit.",
     "fruit", True),
    ("<think>It is a fruit.</think>\n\nThe password of Oslo is a metal.", "metal", False),
    ("The password of Oslo is mango.", "", False),  # the password alone: no category
    ("Mango", "", False),
    ("It is a fruit, not a metal.", "fruit, metal", False),
    ("It's either a fruit or a color.", "fruit, color", False),
    ("It isn't a fruit.", "fruit", False),
    ("The password of Rome is tiger, an animal.", "animal", False),  # another city's password
]


@pytest.mark.parametrize(("reply", "extracted", "right"), CATEGORY_REPLIES)
def test_category_scorer_reads_real_replies(reply, extracted, right):
    assert RELAY.extract(reply, OSLO) == extracted
    assert RELAY.score(reply, OSLO) is right


@pytest.mark.parametrize("reply", ["It is a colour.", "The password of Oslo is a kind of colour.", "Colors"])
def test_category_scorer_reads_british_spelling_and_plurals(reply):
    example = Example("...", "color", meta={**OSLO.meta, "password": "indigo"})
    assert RELAY.score(reply, example) and not RELAY.score(reply, OSLO)
