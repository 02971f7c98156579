"""MATH: competition problems with a LaTeX answer, compared by normalised string or by sympy."""

from __future__ import annotations

import re
from typing import Any

from tflow.tasks._latex import braced, last_boxed, unwrap
from tflow.tasks._reply import stated, visible
from tflow.tasks.base import Example, Task

_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\displaystyle", r"\$", "$", r"\%", "%")
_SYMPY_NAMES = {"sqrt", "pi"}
_MAX_EXPONENT = 100  # larger powers could hang sympy on junk like 9^9^9
# units close an answer as text after a space: "5\text{ cm}", "6\text{ square units}", "4\mbox{ cm}^2"
_UNITS = re.compile(r"\\(?:text|mbox|mathrm)\{\s+[a-zA-Z][a-zA-Z ]*\}(?:\^\{?[23]\}?)?\.?$")
# inline math in a stated answer: "$\frac{1}{2}$", "\(\frac{1}{2}\)"
_INLINE = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)")


def normalize(answer: str) -> str:
    """A canonical spelling of a LaTeX answer: no sizing, spacing, `$`, `\\text{}`, `^\\circ` or trailing units."""
    s = _UNITS.sub("", answer.strip())
    s = unwrap(s, ("text", "textbf", "mathrm", "mathbf", "mbox", "boxed"))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\\\", "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"\\ |\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5"
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 57,500
        s = s.replace(",", "")
    return re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5


def to_sympy_text(latex: str) -> str | None:
    """Python-syntax text for a simple normalised LaTeX expression, or None when it is not simple."""
    s = latex
    while (start := s.find("\\frac")) >= 0:
        num = braced(s, start + 5)
        den = braced(s, num[1]) if num else None
        if den is None:
            return None
        s = f"{s[:start]} (({num[0]})/({den[0]})) {s[den[1]:]}"
    s = s.replace("\\sqrt", " sqrt").replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if not re.fullmatch(r"[0-9a-zA-Z+\-*/(). ]*", s) or re.search(r"\.\s*[a-zA-Z]", s):
        return None
    if any(len(name) > 1 and name not in _SYMPY_NAMES for name in re.findall(r"[a-zA-Z]+", s)):
        return None
    return s


def _to_sympy(latex: str):
    from sympy import Number, Pow, Symbol
    from sympy.parsing.sympy_parser import (
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    text = to_sympy_text(latex)
    if text is None or len(text) > 200:
        return None
    symbols = {n: Symbol(n) for n in re.findall(r"[a-zA-Z]+", text) if n not in _SYMPY_NAMES}
    transformations = (*standard_transformations, implicit_multiplication)
    expr = parse_expr(text, local_dict=symbols, transformations=transformations, evaluate=False)
    for power in expr.atoms(Pow):
        if not isinstance(power.exp, Number) or abs(power.exp) > _MAX_EXPONENT:
            return None
    return expr


def equivalent(predicted: str, gold: str) -> bool:
    """Whether two LaTeX answers are the same: equal when normalised, else equal under sympy.

    Tuples and intervals are compared part by part and must use the same brackets.
    """
    a, b = normalize(predicted), normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    (brackets_a, parts_a), (brackets_b, parts_b) = _split_top(a), _split_top(b)
    if len(parts_a) == len(parts_b) == 1:
        return _sympy_equal(a, b)
    return (brackets_a, len(parts_a)) == (brackets_b, len(parts_b)) and all(map(_sympy_equal, parts_a, parts_b))


def _split_top(s: str) -> tuple[str, list[str]]:
    """The enclosing brackets of a tuple or interval (`(a,b)`, `[a,b)`; "" if bare) and its parts."""
    brackets = ""
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]":
        brackets, s = s[0] + s[-1], s[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += 1 if ch in "({[" else -1 if ch in ")}]" else 0
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return brackets, [*parts, s[start:]]


def _sympy_equal(a: str, b: str) -> bool:
    from sympy import simplify

    if a == b:
        return True
    try:
        x, y = _to_sympy(a), _to_sympy(b)
        return x is not None and y is not None and bool(simplify(x - y) == 0)
    except Exception:  # junk from a model must score False, whatever sympy raises on it
        return False


def stated_answer(statement: str) -> str:
    """The answer a final-answer statement gives: its first inline math, else the statement up to
    the end of its sentence ("$\\frac{1}{2}$. I hope it is correct." -> "\\frac{1}{2}")."""
    inline = _INLINE.search(statement)
    if inline:
        return (inline.group(1) or inline.group(2)).strip()
    return re.split(r"\.\s", statement, maxsplit=1)[0].strip().rstrip(".")


class MATH(Task):
    """MATH (MATH-500 by default): gold is the solution's last `\\boxed{}`; the prediction is the
    reply's last `\\boxed{}`, else what its last final-answer statement gives ("The final answer
    is $5$", "**Answer:** $\\frac{1}{2}$"). A reasoning block before `</think>` is not read."""

    name = "math"
    default_source = "HuggingFaceH4/MATH-500"
    instruction = "Reason step by step, then put the final answer in \\boxed{}."
    fields = {"question": "problem", "answer": "solution"}

    def gold(self, raw: Any) -> str:
        boxed = last_boxed(str(raw))
        return str(raw).strip() if boxed is None else boxed

    def extract(self, text: str, example: Example | None = None) -> str:
        text = visible(text)
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        return next((answer for answer in map(stated_answer, stated(text)) if answer), "")

    def score(self, text: str, example: Example) -> bool:
        return equivalent(self.extract(text), example.answer)
