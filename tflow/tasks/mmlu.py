"""MMLU-Redux: multiple-choice questions over 57 subjects, answered with a choice letter."""

from __future__ import annotations

import re
from typing import Any

from tflow.errors import DataError
from tflow.tasks._latex import last_boxed, unwrap
from tflow.tasks.base import Example, Task, required

LETTERS = "ABCDEFGHIJ"
# choice letters are upper case and stand alone, so the article "a" never reads as choice A
_L = rf"\(?([{LETTERS}])\)?(?![A-Za-z0-9])"
_PATTERNS = (
    re.compile(rf"(?i:answer)(?:\s+is|\s*:)\s*[:*\s]*{_L}"),  # "the answer is (C)", "Answer: D"
    re.compile(rf"\\text\{{\s*{_L}"),  # \text{B}
    re.compile(rf"^[\s*]*{_L}[.):*\s]*$", re.MULTILINE),  # a line holding only "B" / "(B)" / "**B.**"
    re.compile(rf"(?<![A-Za-z0-9])\(([{LETTERS}])\)"),  # "(B)" anywhere
)


def extract_letter(text: str) -> str:
    """The choice letter a reply settles on ("" when none): `\\boxed{}` first, then textual cues."""
    boxed = last_boxed(text)
    if boxed is not None:
        inner = unwrap(boxed, ("text", "textbf", "mathrm")).strip()
        match = re.match(_L, inner)
        if match:
            return match.group(1)
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1]
    return ""


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

    def extract(self, text: str) -> str:
        return extract_letter(text)

    def configs(self, source: str, config: str | None) -> list[str | None]:
        if config is not None:
            return [config]
        import datasets

        return list(datasets.get_dataset_config_names(source))
