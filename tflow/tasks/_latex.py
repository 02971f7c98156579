"""LaTeX helpers shared by the scorers: balanced-brace `\\boxed{}` extraction and command unwrapping."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the balanced `{...}` group opening at `text[start]` and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last non-empty `\\boxed{...}` (nested braces allowed), or None when there is none.

    An empty `\\boxed{}` is the instruction restated ("I will put the answer in \\boxed{}"), not an answer.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        group = braced(text, match.end())
        if group is None:
            # `\boxed 5` without braces: take the next token
            token = re.match(r"[^\s$]+", text[match.end() :])
            if token:
                return token.group(0)
        elif group[0].strip():
            return group[0].strip()
    return None


def unwrap(text: str, commands: tuple[str, ...]) -> str:
    """Replace every `\\cmd{x}` (for cmd in `commands`) by `x`, nested groups included."""
    pattern = re.compile(r"\\(?:" + "|".join(commands) + r")\s*(?=\{)")
    while match := pattern.search(text):
        group = braced(text, match.end())
        if group is None:
            return text[: match.start()] + text[match.end() :]
        text = text[: match.start()] + group[0] + text[group[1] :]
    return text
