"""Reading model replies: the part after a reasoning block, and what follows a final-answer marker."""

from __future__ import annotations

import re

# "The answer is", "answer would be", "Answer:", "**Answer:**", "answer =", and GSM8K's "#### 18"
# (only before a number: "#### Step 2" is a markdown heading)
_MARKER = re.compile(r"####(?=[ \t]*[-$\\\d.])|\banswer\b\**\s*(?:is\b|would be\b|should be\b|[:=])",
                     re.IGNORECASE)


def visible(text: str) -> str:
    """The reply after its reasoning block (the text after the last `</think>`), else all of it."""
    return text.rsplit("</think>", 1)[-1]


def stated(text: str) -> list[str]:
    """What each final-answer marker in `text` introduces, the last marker first.

    A statement is the rest of the marker's line, or the next non-blank line when that is empty
    ("**Answer:**\\n\\n18"), without surrounding markdown bold.
    """
    statements = []
    for match in reversed(list(_MARKER.finditer(text))):
        rest = text[match.end() :].lstrip(" \t*:").lstrip()
        statements.append(rest.split("\n", 1)[0].strip().strip("*").strip())
    return statements
