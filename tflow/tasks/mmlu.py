"""MMLU-Redux: multiple-choice questions over 57 subjects, answered with a choice letter."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tflow.errors import DataError
from tflow.tasks._latex import last_boxed, unwrap
from tflow.tasks._reply import stated, visible
from tflow.tasks.base import Example, Task, required

LETTERS = "ABCDEFGHIJ"
# choice letters are upper case and stand alone, so the article "a" never reads as choice A,
# and the pronoun ("I think", "I'm") never as choice I
_L = rf"\(?(?!I(?:['’]|\s+[a-z]))([{LETTERS}])\)?(?![A-Za-z0-9])"
# a boxed or stated answer that opens with a letter: "B", "(B) Paris", "B. Paris", "option B"
_OPENS = re.compile(rf"(?i:option|choice)?\s*{_L}")
_CUES = (
    re.compile(rf"\\text\{{\s*{_L}"),  # \text{B}
    re.compile(rf"{_L}\s+(?i:is\s+(?:the\s+)?(?:correct|right|best))\b"),  # "Option B is correct"
    re.compile(rf"(?i:(?:correct|right|best)\s+(?:option|choice)\s*(?:is\b|:))[:*\s]*{_L}"),  # "The correct choice is (B)"
    re.compile(rf"^[\s*]*{_L}[.):*\s]*$", re.MULTILINE),  # a line holding only "B" / "(B)" / "**B.**"
)
# weak cues count only when they single out one letter: a restated choice list names every letter
_WEAK = (
    re.compile(rf"^[\s*#>-]*\(?([{LETTERS}])[.):]", re.MULTILINE),  # a line opening "B. Paris", "(B) Paris"
    re.compile(rf"(?<![A-Za-z0-9])\(([{LETTERS}])\)"),  # "(B)" anywhere
)


def extract_letter(text: str, choices: Sequence[str] = ()) -> str:
    """The choice letter a reply settles on ("" when none), reading a reply's parts in order:

    a `\\boxed{}` or final-answer statement opening with a letter ("The answer is (B)"), other
    explicit cues ("Option B is correct", `\\text{B}`, a line holding only "B"), the one choice
    whose text the boxed or stated answer names ("The answer is Paris"), a letter weak cues single
    out ("B. Paris", "(B)"), and the one choice whose text the reply names. Given `choices`, only
    their letters count and their texts are read; a reasoning block before `</think>` is not read.
    """
    valid = set(LETTERS[: len(choices)] or LETTERS)
    text = visible(text)
    boxed = last_boxed(text)
    statements = [unwrap(boxed, ("text", "textbf", "mathrm")).strip()] if boxed else []
    statements += stated(text)
    for statement in statements:
        match = _OPENS.match(statement)
        if match and match.group(1) in valid:
            return match.group(1)
    for cue in _CUES:
        found = [letter for letter in cue.findall(text) if letter in valid]
        if found:
            return found[-1]
    for statement in statements:
        named = named_choice(statement, choices)
        if named:
            return named
    weak = {letter for cue in _WEAK for letter in cue.findall(text) if letter in valid}
    if len(weak) == 1:
        return weak.pop()
    return named_choice(text, choices)


def named_choice(text: str, choices: Sequence[str]) -> str:
    """The letter of the one choice whose words `text` contains ("" when none or several do).

    Case and punctuation are ignored; a choice inside another named one ("Paris" in "Paris,
    Texas") does not count by itself.
    """
    said = f" {_words(text)} "
    found = {letter: words for letter, words in zip(LETTERS, map(_words, choices), strict=False)
             if words and f" {words} " in said}
    named = [letter for letter, words in found.items()
             if not any(words != other and f" {words} " in f" {other} " for other in found.values())]
    return named[0] if len(named) == 1 else ""


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", str(text).lower()))


class MMLURedux(Task):
    """MMLU-Redux 2.0: `choices` listed as "A. ...", gold letter from the answer index.

    With `config=None` every subject config of the hub dataset is read; `meta["config"]` names it.
    """

    name = "mmlu"
    default_source = "edinburgh-dawg/mmlu-redux-2.0"
    instruction = "Reason briefly, then give the letter of the correct choice in \\boxed{}, e.g. \\boxed{A}."
    fields = {"question": "question", "answer": "answer", "choices": "choices"}

    def gold(self, raw: Any) -> str:
        """The gold letter from an answer index (0 -> "A") or a letter.

        Raises:
            DataError: the answer is neither an index nor a choice letter.
        """
        text = str(raw).strip()
        if text.isdigit() and int(text) < len(LETTERS):
            return LETTERS[int(text)]
        if len(text) == 1 and text.upper() in LETTERS:
            return text.upper()
        raise DataError(f"MMLU answer {raw!r} is neither a choice index nor a letter")

    def prompt(self, example: Example) -> str:
        """The question, its choices as "A. ..." lines, and the instruction.

        Raises:
            DataError: the example has no `choices` in its meta.
        """
        (choices,) = required(example, "choices")
        listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=False))
        return f"{example.question.strip()}\n\n{listed}\n\n{self.instruction}"

    def extract(self, text: str, example: Example | None = None) -> str:
        choices = None if example is None else example.meta.get("choices")
        return extract_letter(text, [] if choices is None else [str(c) for c in choices])

    def score(self, text: str, example: Example) -> bool:
        """Whether the reply picks the gold letter; a reply may name its choice by the choice's text."""
        return self.extract(text, example) == example.answer

    def configs(self, source: str, config: str | None) -> list[str | None]:
        if config is not None:
            return [config]
        import datasets

        return list(datasets.get_dataset_config_names(source))
