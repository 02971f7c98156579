"""GSM8K: grade-school word problems with a numeric answer, compared as numbers."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from tflow.tasks._latex import last_boxed
from tflow.tasks.base import Example, Task

# thousands groups only as 1,234,567 so a list like "1,2" is not read as 12
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number written in `text` (commas kept), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(text: str) -> Fraction | None:
    """`text` as an exact number ("$57,500." -> 57500, "3.0" -> 3), or None when it holds none."""
    number = last_number(text.replace("\\$", "").replace("$", ""))
    if number is None:
        return None
    return Fraction(number.replace(",", ""))


class GSM8K(Task):
    """GSM8K: gold after `####`; the prediction is the last `\\boxed{}` or else the last number."""

    name = "gsm8k"
    default_source = "openai/gsm8k"
    default_config = "main"
    instruction = "Reason step by step, then put the final numeric answer in \\boxed{}."

    def gold(self, raw: Any) -> str:
        return str(raw).rsplit("####", 1)[-1].strip().replace(",", "")

    def extract(self, text: str) -> str:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        return last_number(text) or ""

    def score(self, text: str, example: Example) -> bool:
        predicted, gold = to_number(self.extract(text)), to_number(example.answer)
        return predicted is not None and predicted == gold
