"""Relay: a synthetic task where only a sender's private context holds the fact the receiver is asked.

Every example asks about one (entity, value) fact; one sender, drawn per example, holds it, so
the receiver can only answer by what the senders communicate. Two formats:

- `toy`: each sender's context is one fact; every other sender's is about another entity.
- `documents`: each sender reads a document of `facts` facts. The holder's document has the
  asked fact among unrelated ones; every other sender's document holds confusable facts: the
  asked entity's other kind of value, and the asked kind of value for another entity.

Generation is seeded and needs no download.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tflow.errors import DataError
from tflow.tasks.base import Example, Task

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
INSTRUCTION = "Answer with the value only."
SENTENCE_INSTRUCTION = "Answer in one sentence."
VALUES = frozenset(v.casefold() for _, _, values in KINDS.values() for v in values)
TEST_SIZE = 200
FORMATS = ("toy", "documents")
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
            a kind or format is unknown, `facts` is too small or too large for the format, or
            `exclude` leaves too few facts to draw from.
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
    if format == "documents" and not 2 <= facts <= len(CITIES) // 2:
        raise DataError(f"relay facts per document must be 2 to {len(CITIES) // 2}, got {facts}")
    draw = _toy if format == "toy" else _documents
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


def split(
    seed: int, n_train: int, n_test: int, **options: Any
) -> tuple[list[Example], list[Example]]:
    """Train and test examples such that no test fact (entity, value) appears in any training context.

    `options` go to `generate` (senders, kinds).
    """
    test = generate(n_test, seed, **options)
    used = {fact for example in test for fact in example.meta["facts"]}
    return generate(n_train, seed + 1, exclude=used, **options), test


_split = split  # Relay.load's `split` argument shadows the function


def corpus() -> list[str]:
    """Text lines holding every word and number the task can produce (to train a tokenizer on)."""
    lines = [INSTRUCTION]
    for fact, question, values in KINDS.values():
        lines += [question.format(entity=entity) for entity in CITIES]
        lines += [fact.format(entity=CITIES[i % len(CITIES)], value=v) for i, v in enumerate(values)]
    return lines


class Relay(Task):
    """The relay task: the reply must state the asked fact's value and no other candidate value.

    Candidates are every value of every kind and every value in the example's contexts, so
    "The password of Helsinki is jasmine." is right, and a reply that states another sender's
    distractor, or two values, is wrong.
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
        """The question and its instruction: the value only (toy), or one sentence (documents)."""
        sentence = example.meta.get("format") == "documents"
        return f"{example.question}\n\n{SENTENCE_INSTRUCTION if sentence else INSTRUCTION}"

    def target(self, example: Example, answer_column: str = "answer") -> str:
        """The toy format's answer is the value; the documents format's is the fact's sentence.

        The toy value has a leading space: byte-level BPE folds it into the word, so the answer
        is the very token that stands in the fact ("... is 482." holds " 482"). The sentence is
        how real instruct models answer, and its value is that token too.
        """
        if example.meta.get("format") == "documents":
            return KINDS[example.meta["kind"]][0].format(entity=example.meta["entity"], value=example.answer)
        return f" {example.answer}"

    def extract(self, text: str, example: Example | None = None) -> str:
        """Every candidate value the reply states, in order, each once, joined by ", ": the values
        of every kind, and those of the example's documents."""
        return ", ".join(_mentioned(text, _candidates(example)))

    def score(self, text: str, example: Example) -> bool:
        """Right when the reply states the asked value and no other candidate, and negates nothing
        ("The password of Oslo is not tiger." states tiger but does not answer with it)."""
        return not NEGATION.search(text) and _mentioned(text, _candidates(example)) == [example.answer.casefold()]


def _candidates(example: Example | None) -> Collection[str]:
    if example is None:
        return VALUES
    return VALUES | {str(v).casefold() for _, v in example.meta.get("facts", ())}


def _mentioned(text: str, candidates: Collection[str]) -> list[str]:
    """The words and numbers of `text` that are candidates (casefolded), in order, each once."""
    words = (w.casefold() for w in re.findall(r"[A-Za-z0-9]+", text))
    return list(dict.fromkeys(w for w in words if w in candidates))
