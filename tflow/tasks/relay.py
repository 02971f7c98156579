"""Relay: a synthetic task where only a sender's private context holds the fact the receiver is asked.

Every example asks about one (entity, value) fact; one sender, drawn per example, holds it, so
the receiver can only answer by what the senders communicate. Three formats:

- `toy`: each sender's context is one fact; every other sender's is about another entity.
- `documents`: each sender reads a document of `facts` facts. The holder's document has the
  asked fact among unrelated ones; every other sender's document holds confusable facts: the
  asked entity's other kind of value, and the asked kind of value for another entity.
- `category`: `documents`, but every password is a word of one of four categories (animal,
  color, fruit, metal) and the question asks which category the city's password belongs to,
  naming the four in a shuffled order. The answer, the category, is in no document: the
  documents state passwords, never categories, so copying any word of them is wrong. The
  other documents hold the city's secret code and another city's password of another
  category. Chance is 1/4 (`Relay.chance`).

Generation is seeded and needs no download.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tflow.errors import DataError
from tflow.tasks._reply import visible
from tflow.tasks.base import Example, Task, required

CITIES = (
    "Lisbon Paris Oslo Cairo Lima Tokyo Dublin Vienna Prague Madrid Berlin Rome Athens Warsaw "
    "Helsinki Nairobi Havana Quito Bogota Santiago Sydney Toronto Mumbai Seoul Hanoi Manila "
    "Jakarta Istanbul Moscow Riga Tallinn Zurich"
).split()
WORDS = (
    "apple anchor arrow badge banjo barrel basket beacon bell blanket bottle bracket bridge brush "
    "bucket button cabin camera candle canoe canvas carpet castle cattle cedar chalk cherry chimney "
    "cider circus clock cloud clover cobalt comet copper coral cotton crayon crystal dagger daisy "
    "desert diamond dolphin dragon drum eagle easel ember falcon feather fern fiddle flute forest "
    "fossil garden garlic ginger glacier goblet granite guitar hammer harbor helmet honey island "
    "ivory jacket jasmine jelly kettle kite ladder lantern lemon lizard magnet mango marble meadow "
    "mirror mitten needle nickel oasis orchid otter paddle pebble pepper pillow planet pocket "
    "pumpkin quartz rabbit radar ribbon river rocket saddle salmon shovel silver sparrow spider "
    "tiger tulip velvet violin walnut willow window zebra"
).split()
# kind -> (fact template, question template, possible values)
KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "code": (
        "The secret code of {entity} is {value}.",
        "What is the secret code of {entity}?",
        tuple(str(v) for v in range(100, 1000)),
    ),
    "password": ("The password of {entity} is {value}.", "What is the password of {entity}?", tuple(WORDS)),
}
# category -> its passwords: common words (one SmolLM2 token, a few two) of no other category,
# so no orange (fruit, color), silver (metal, color) or kiwi (fruit, bird)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": tuple("tiger zebra rabbit horse camel wolf lion goat sheep monkey donkey giraffe panda dolphin "
                    "lizard squirrel".split()),
    "color": tuple("red blue green yellow purple pink brown black white gray scarlet navy indigo cyan "
                   "turquoise crimson".split()),
    "fruit": tuple("apple mango banana grape pear papaya pineapple strawberry coconut fig melon watermelon "
                   "pomegranate cranberry guava blueberry".split()),
    "metal": tuple("iron zinc tin nickel aluminum titanium tungsten chromium magnesium lithium platinum "
                   "uranium cadmium palladium sodium potassium".split()),
}
CATEGORY_QUESTION = "Which kind of word is the password of {entity}: {options}?"
CATEGORY_ANSWER = "The password of {entity} is {category}."
# the words a reply may name a category by
CATEGORY_NAMES = {"animal": "animal", "animals": "animal", "color": "color", "colors": "color", "colour": "color",
                  "colours": "color", "fruit": "fruit", "fruits": "fruit", "metal": "metal", "metals": "metal"}
INSTRUCTION = "Answer with the value only."
SENTENCE_INSTRUCTION = "Answer in one sentence."
VALUES = frozenset(v.casefold() for _, _, values in KINDS.values() for v in values)
TEST_SIZE = 200
FORMATS = ("toy", "documents", "category")
NEGATION = re.compile(r"\b(?:not|no|never|cannot)\b|n't\b", re.IGNORECASE)


def generate(
    n: int,
    seed: int,
    *,
    senders: Sequence[str] = ("reader",),
    kinds: Sequence[str] = tuple(KINDS),
    exclude: Collection[tuple[str, str]] = (),
    format: str = "toy",
    facts: int = 4,
) -> list[Example]:
    """`n` examples drawn with `seed`; no context states an (entity, value) fact in `exclude`.

    Raises:
        DataError: `n` is negative, `senders` is empty, repeats a name or outnumbers the cities,
            a kind or format is unknown, `facts` is too small or too large for the format, the
            category format's `kinds` lack "password", or `exclude` leaves too few facts to draw from.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if not senders or len(set(senders)) != len(senders) or len(senders) > len(CITIES):
        raise DataError(f"senders must be 1 to {len(CITIES)} distinct names, got {list(senders)}")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise DataError(f"unknown relay kind(s) {unknown or list(kinds)}; kinds: {sorted(KINDS)}")
    if format not in FORMATS:
        raise DataError(f"unknown relay format {format!r}; formats: {', '.join(FORMATS)}")
    if format != "toy":
        if not 2 <= facts <= len(CITIES) // 2:
            raise DataError(f"relay facts per document must be 2 to {len(CITIES) // 2}, got {facts}")
        if 1 + len(senders) * facts > len(CITIES):
            raise DataError(f"{len(senders)} senders with {facts} facts each need more than {len(CITIES)} cities")
    if format == "category" and "password" not in kinds:
        raise DataError(f"the relay category format asks about passwords; kinds {list(kinds)} lack 'password'")
    draw = {"toy": _toy, "documents": _documents, "category": _category}[format]
    rng = random.Random(f"relay-{seed}")  # a str seed is hashed stably across runs
    excluded = set(exclude)
    examples: list[Example] = []
    rejected = 0
    while len(examples) < n:
        example = draw(rng, list(senders), list(kinds), facts)
        if excluded.intersection(example.meta["facts"]):
            rejected += 1
            if rejected > 10_000 + 100 * n:
                raise DataError(f"cannot draw {n} relay examples: `exclude` covers almost every fact")
            continue
        examples.append(example)
    return examples


def _toy(rng: random.Random, senders: list[str], kinds: list[str], facts: int) -> Example:
    """One fact per sender, all of one kind, about distinct entities; the first holder's is asked."""
    kind = rng.choice(kinds)
    fact, question, values = KINDS[kind]
    drawn = [(entity, rng.choice(values)) for entity in rng.sample(CITIES, len(senders))]
    holders = rng.sample(senders, len(senders))  # holders[0] holds the asked fact
    told = dict(zip(holders, drawn, strict=True))
    entity, value = drawn[0]
    return Example(
        question=question.format(entity=entity),
        answer=value,
        contexts={name: fact.format(entity=e, value=v) for name, (e, v) in told.items()},
        meta={"kind": kind, "entity": entity, "holder": holders[0], "facts": drawn, "format": "toy"},
    )


def _documents(rng: random.Random, senders: list[str], kinds: list[str], facts: int) -> Example:
    """A document of `facts` facts per sender: the holder's states the asked fact, the others confusable ones."""
    kind = rng.choice(kinds)
    entity, *others = rng.sample(CITIES, 1 + len(senders) * facts)
    holder = rng.choice(senders)
    other_kinds = [k for k in KINDS if k != kind]
    documents, drawn = {}, []
    for name in senders:
        if name == holder:
            stated = [(entity, kind)]
        else:  # the asked entity's other value, and the asked kind for another entity
            stated = [(entity, rng.choice(other_kinds))] if other_kinds else []
            stated.append((others.pop(), kind))
        stated += [(others.pop(), rng.choice(list(KINDS))) for _ in range(facts - len(stated))]
        rng.shuffle(stated)
        told = [(e, k, rng.choice(KINDS[k][2])) for e, k in stated]
        documents[name] = " ".join(KINDS[k][0].format(entity=e, value=v) for e, k, v in told)
        drawn += [(e, v) for e, _, v in told]
        if name == holder:
            value = next(v for e, k, v in told if (e, k) == (entity, kind))
    return Example(
        question=KINDS[kind][1].format(entity=entity),
        answer=value,
        contexts=documents,
        meta={"kind": kind, "entity": entity, "holder": holder, "facts": drawn, "format": "documents"},
    )


def _category(rng: random.Random, senders: list[str], kinds: list[str], facts: int) -> Example:
    """A document of `facts` facts per sender, passwords drawn from CATEGORIES; the question asks the
    category of the holder's password, the others' documents hold the city's code and another
    city's password of another category."""
    entity, *others = rng.sample(CITIES, 1 + len(senders) * facts)
    holder = rng.choice(senders)
    category = rng.choice(list(CATEGORIES))
    options = rng.sample(list(CATEGORIES), len(CATEGORIES))
    documents, drawn = {}, []
    for name in senders:
        if name == holder:
            stated = [(entity, "password", category)]
        else:
            stated = [(entity, "code", None),
                      (others.pop(), "password", rng.choice([c for c in CATEGORIES if c != category]))]
        for _ in range(facts - len(stated)):
            kind = rng.choice(list(KINDS))
            stated.append((others.pop(), kind, rng.choice(list(CATEGORIES)) if kind == "password" else None))
        rng.shuffle(stated)
        told = [(e, k, rng.choice(CATEGORIES[c] if c else KINDS[k][2])) for e, k, c in stated]
        documents[name] = " ".join(KINDS[k][0].format(entity=e, value=v) for e, k, v in told)
        drawn += [(e, v) for e, _, v in told]
        if name == holder:
            password = next(v for e, k, v in told if (e, k) == (entity, "password"))
    return Example(
        question=CATEGORY_QUESTION.format(entity=entity, options=_either(options)),
        answer=category,
        contexts=documents,
        meta={"kind": "password", "entity": entity, "holder": holder, "facts": drawn, "format": "category",
              "password": password, "options": options},
    )


def split(
    seed: int, n_train: int, n_test: int, **options: Any
) -> tuple[list[Example], list[Example]]:
    """Train and test examples such that no test fact (entity, value) appears in any training context.

    `options` go to `generate` (senders, kinds, format, facts).
    """
    test = generate(n_test, seed, **options)
    used = {fact for example in test for fact in example.meta["facts"]}
    return generate(n_train, seed + 1, exclude=used, **options), test


_split = split  # Relay.load's `split` argument shadows the function


def corpus(format: str = "toy") -> list[str]:
    """Text lines holding every word and number the task can produce in `format` (to train a
    tokenizer on); `toy` and `documents` share theirs."""
    lines = [INSTRUCTION]
    for fact, question, values in KINDS.values():
        lines += [question.format(entity=entity) for entity in CITIES]
        lines += [fact.format(entity=CITIES[i % len(CITIES)], value=v) for i, v in enumerate(values)]
    if format == "category":
        options = _either(list(CATEGORIES))
        lines += [SENTENCE_INSTRUCTION] + [CATEGORY_QUESTION.format(entity=e, options=options) for e in CITIES]
        lines += [KINDS["password"][0].format(entity=CITIES[0], value=v) for vs in CATEGORIES.values() for v in vs]
        lines += [CATEGORY_ANSWER.format(entity=CITIES[0], category=_article(c)) for c in CATEGORIES]
    return lines


class Relay(Task):
    """The relay task: the reply must state the asked fact's value and no other candidate value.

    Candidates are every value of every kind and every value in the example's contexts, so
    "The password of Helsinki is jasmine." is right, and a reply that states another sender's
    distractor, or two values, is wrong. In the category format the candidates are the
    categories: "It's a fruit." is right, "mango" (the password only) or "a fruit or a metal" wrong.
    """

    name = "relay"
    instruction = INSTRUCTION

    def load(
        self,
        source: str | Path | None = None,
        *,
        config: str | None = None,
        split: str = "test",
        limit: int | None = None,
        fields: dict[str, str] | None = None,
    ) -> list[Example]:
        """The seed-0 split's "train" (1000 examples, or `limit`) or "test" (200, or `limit`) half.

        Training facts avoid the first 200 test examples' facts.

        Raises:
            DataError: a source, config or fields is given (the task is synthetic) or the split is
                neither "train" nor "test".
        """
        if source is not None or config is not None or fields:
            raise DataError("the relay task is synthetic: it takes no source, config or fields")
        if split not in ("train", "test"):
            raise DataError(f"relay split must be 'train' or 'test', got {split!r}")
        if split == "train":
            return _split(0, 1000 if limit is None else limit, TEST_SIZE)[0]
        return _split(0, 0, TEST_SIZE if limit is None else limit)[1]

    def prompt(self, example: Example) -> str:
        """The question and its instruction: the value only (toy), or one sentence (documents, category)."""
        sentence = example.meta.get("format") in ("documents", "category")
        return f"{example.question}\n\n{SENTENCE_INSTRUCTION if sentence else INSTRUCTION}"

    def target(self, example: Example, answer_column: str = "answer") -> str:
        """The toy format's answer is the value; the documents format's is the fact's sentence.

        The toy value has a leading space: byte-level BPE folds it into the word, so the answer
        is the very token that stands in the fact ("... is 482." holds " 482"). The sentence is
        how real instruct models answer, and its value is that token too. The category format's
        is "The password of Oslo is a fruit.": it names the category and not the password.
        """
        if example.meta.get("format") == "category":
            return CATEGORY_ANSWER.format(entity=example.meta["entity"], category=_article(example.answer))
        if example.meta.get("format") == "documents":
            return KINDS[example.meta["kind"]][0].format(entity=example.meta["entity"], value=example.answer)
        return f" {example.answer}"

    def extract(self, text: str, example: Example | None = None) -> str:
        """Every candidate value the reply states, in order, each once, joined by ", ": the values
        of every kind, and those of the example's documents; for a category example, the
        categories it names after any reasoning block ("fruits" and "colour" name fruit and color)."""
        if example is not None and example.meta.get("format") == "category":
            return ", ".join(_categories(visible(text)))
        return ", ".join(_mentioned(text, _candidates(example)))

    def score(self, text: str, example: Example) -> bool:
        """Right when the reply states the asked value and no other candidate, and negates nothing
        ("The password of Oslo is not tiger." states tiger but does not answer with it); a category
        reply is read after its reasoning block, and is right when it names the asked category
        alone ("It is a fruit, not a metal." names two)."""
        if example.meta.get("format") == "category":
            text = visible(text)
            return not NEGATION.search(text) and _categories(text) == [example.answer]
        return not NEGATION.search(text) and _mentioned(text, _candidates(example)) == [example.answer.casefold()]

    def chance(self, example: Example) -> float:
        """The accuracy of a uniform guess among the answers the question allows: 1/4 for a
        category example (its options), one over the asked kind's values otherwise."""
        if example.meta.get("format") == "category":
            return 1 / len(example.meta["options"])
        return 1 / len(KINDS[required(example, "kind")[0]][2])


def _candidates(example: Example | None) -> Collection[str]:
    if example is None:
        return VALUES
    return VALUES | {str(v).casefold() for _, v in example.meta.get("facts", ())}


def _mentioned(text: str, candidates: Collection[str]) -> list[str]:
    """The words and numbers of `text` that are candidates (casefolded), in order, each once."""
    words = (w.casefold() for w in re.findall(r"[A-Za-z0-9]+", text))
    return list(dict.fromkeys(w for w in words if w in candidates))


def _categories(text: str) -> list[str]:
    """The categories `text` names, in order, each once."""
    return list(dict.fromkeys(CATEGORY_NAMES[w] for w in _mentioned(text, CATEGORY_NAMES)))


def _either(options: list[str]) -> str:
    return f"{', '.join(options[:-1])} or {options[-1]}"


def _article(category: str) -> str:
    return f"{'an' if category[0] in 'aeiou' else 'a'} {category}"
