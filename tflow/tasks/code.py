"""Code generation (HumanEval+, MBPP+): pass@1 by running the completion against the tests.

Running model code here is NOT a sandbox. Each program runs in a fresh isolated interpreter
(`python -I`) in a temporary working directory, with a minimal environment (no proxies, no
tokens), resource limits (memory, CPU time, file size; POSIX only) and a wall-clock timeout
after which its whole process group is killed. It can still read files and open sockets:
run untrusted code inside a container or VM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tflow.tasks.base import Example, Task, required

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)

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


def extract_code(text: str) -> str:
    """The longest ```python (or unlabeled) fenced block in `text`, else the whole text."""
    blocks = _FENCE.findall(text)
    return max(blocks, key=len) if blocks else text


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

    def extract(self, text: str) -> str:
        return extract_code(text)

    def program(self, code: str, example: Example) -> str:
        """The script that runs `code` against `example`'s tests."""
        raise NotImplementedError

    def score(self, text: str, example: Example) -> bool:
        return run_program(self.program(self.extract(text), example), self.timeout)


class HumanEval(CodeTask):
    """HumanEval+: complete a function from its signature and docstring."""

    name = "humaneval"
    default_source = "evalplus/humanevalplus"
    fields = {"question": "prompt", "answer": "canonical_solution", "test": "test", "entry_point": "entry_point"}

    def prompt(self, example: Example) -> str:
        return f"Complete the following Python function.\n\n```python\n{example.question}```\n\n{self.instruction}"

    def program(self, code: str, example: Example) -> str:
        # the signature comes first so a body-only completion works; a full `def` overrides it
        test, entry_point = required(example, "test", "entry_point")
        return f"{example.question}{code}\n\n{test}\n\ncheck({entry_point})\n"


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
        test, imports = required(example, "test", "test_imports")
        return "\n".join([*imports, code, "", test, ""])
