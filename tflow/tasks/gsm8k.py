"""GSM8K: grade-school word problems with a numeric answer, compared as numbers."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from tflow.tasks._latex import last_boxed
from tflow.tasks._reply import stated, visible
from tflow.tasks.base import Example, Task

# thousands groups only as 1,234,567 so a list like "1,2" is not read as 12; a minus sign counts
# only where it cannot be a hyphen or an operator ("pages 12-15", "16-3-4")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def last_number(text: str) -> str | None:
    """The last number written in `text` (commas kept), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(text: str) -> Fraction | None:
    """`text` as an exact number ("$57,500." -> 57500, "3.0" -> 3, "1{,}234" -> 1234), or None when it holds none."""
    number = last_number(text.replace("{,}", ",").replace("\\$", "").replace("$", ""))
    if number is None:
        return None
    return Fraction(number.replace(",", ""))


def stated_number(statement: str) -> str | None:
    """The number a final-answer statement gives: the first one, or the first after its last `=`.

    "18 dollars (9 eggs at $2)" -> 18; "16 - 3 - 4 = 9 eggs, 9 * $2 = $18" -> 18.
    """
    numbers = _NUMBER.findall(statement.rsplit("=", 1)[-1].replace("{,}", ","))
    return numbers[0] if numbers else None


class GSM8K(Task):
    """GSM8K: gold after `####`; the prediction is the last `\\boxed{}`, else the number the last
    final-answer statement gives ("#### 18", "The answer is: 18", "**Answer:** $18"), else the
    last number in the reply. A reasoning block before `</think>` is not read."""

    name = "gsm8k"
    default_source = "openai/gsm8k"
    default_config = "main"
    instruction = "Reason step by step, then put the final numeric answer in \\boxed{}."

    def gold(self, raw: Any) -> str:
        return str(raw).rsplit("####", 1)[-1].strip().replace(",", "")

    def extract(self, text: str, example: Example | None = None) -> str:
        text = visible(text)
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        # a statement beats the last number: the reply may go on to restate the question or explain
        for statement in stated(text):
            number = stated_number(statement)
            if number is not None:
                return number
        return last_number(text) or ""

    def score(self, text: str, example: Example) -> bool:
        predicted, gold = to_number(self.extract(text)), to_number(example.answer)
        return predicted is not None and predicted == gold
