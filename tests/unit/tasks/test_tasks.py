"""Tasks: the registry, prompts, answer extraction and scoring of gsm8k, MATH, MMLU, code and relay."""

import json
import re

import pytest

from tflow import tasks
from tflow.errors import DataError
from tflow.tasks import Example, relay
from tflow.tasks.code import HumanEval, extract_code
from tflow.tasks.math_task import equivalent

ADD = Example(
    question='def add(a, b):\n    """Return the sum of a and b."""\n',
    answer="    return a + b\n",
    meta={"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
)


def test_registry_lists_tasks_and_rejects_unknown_names():
    assert {"gsm8k", "math", "mmlu", "humaneval", "mbpp", "relay"} <= set(tasks.available())
    assert tasks.get("gsm8k").name == "gsm8k"
    with pytest.raises(DataError, match=r"unknown task 'gsm9k'; available: .*gsm8k"):
        tasks.get("gsm9k")


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("so the total is \\boxed{57,500}", True),
        ("The answer is $57,500.", True),
        ("\\boxed{57500.0} dollars", True),
        ("First 12, then 57,500 in all.", True),
        ("\\boxed{\\text{57,500}}", True),
        ("\\boxed{57,501}", False),
        ("I do not know", False),
    ],
)
def test_gsm8k_compares_numbers(reply, right):
    task = tasks.get("gsm8k")
    example = Example("q", task.gold("She earns 500 * 115 = <<500*115=57500>>57500.\n#### 57,500"))
    assert example.answer == "57500"
    assert task.score(reply, example) is right


@pytest.mark.parametrize(
    ("predicted", "gold", "same"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
        ("\\boxed{(1,2)}", "[1,2]", False),
        ("\\boxed{\\text{(B)}}", "(B)", True),
        ("\\boxed{90^\\circ}", "90", True),
        ("\\boxed{0.333}", "\\frac{1}{3}", False),
        ("\\boxed{9^{9^{9^{9}}}}", "1", False),
        ("\\boxed{__import__('os')}", "1", False),
        ("\\boxed{}}{\\frac{", "1", False),
        ("the answer is 1/2", "\\frac{1}{2}", True),
        ("it is 1/2", "\\frac{1}{2}", False),  # neither boxed nor stated as the answer
    ],
)
def test_math_equivalence(predicted, gold, same):
    task = tasks.get("math")
    assert task.score(predicted, Example("q", gold)) is same


def test_math_gold_is_the_solutions_last_boxed_and_never_crashes_on_junk():
    task = tasks.get("math")
    assert task.gold("So $x=\\boxed{1}$, hence $\\boxed{\\frac{\\sqrt{3}}{2}}$.") == "\\frac{\\sqrt{3}}{2}"
    for junk in ["\\frac{", "{{{", "\\sqrt[", "1/0", "x**", "\\frac{1}{0}", "(((", ","]:
        assert equivalent(junk, "1") is False


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("... so \\boxed{B}", "B"),
        ("\\boxed{\\text{B}}", "B"),
        ("The correct one is \\text{B}.", "B"),
        ("Therefore the answer is (C).", "C"),
        ("Answer: D", "D"),
        ("Let me think.\n\nB\n", "B"),
        ("This is a good choice, a very good one.", ""),
        ("A good choice would be to think again.", ""),
        ("the answer is a good question", ""),
    ],
)
def test_mmlu_extracts_choice_letters_not_the_article_a(reply, letter):
    assert tasks.get("mmlu").extract(reply) == letter


def test_mmlu_gold_from_index_and_prompt_lists_choices():
    task = tasks.get("mmlu")
    example = Example("Capital of France?", task.gold(1), meta={"choices": ["Rome", "Paris", "Oslo", "Lima"]})
    assert example.answer == "B"
    assert "A. Rome\nB. Paris\nC. Oslo\nD. Lima" in task.prompt(example)
    assert task.score("\\boxed{B}", example) and not task.score("\\boxed{A}", example)
    with pytest.raises(DataError, match="choices"):
        task.prompt(Example("q", "A"))


def test_extract_code_prefers_a_fenced_block():
    assert extract_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```py\nshort\n```\n```\nlonger block\n```") == "longer block\n"
    assert extract_code("x = 2") == "x = 2"


@pytest.mark.parametrize(
    ("reply", "passes"),
    [
        ("```python\ndef add(a, b):\n    return a + b\n```", True),
        ("    return a + b\n", True),
        ("```python\ndef add(a, b):\n    return a - b\n```", False),
        ("```python\ndef add(a, b):\n    raise SystemExit(0)\n```", True),  # pass@1 is the exit code
        ("this is not python", False),
    ],
)
def test_humaneval_runs_the_tests(reply, passes):
    assert HumanEval(timeout=5).score(reply, ADD) is passes


def test_code_that_loops_forever_times_out_and_fails():
    assert HumanEval(timeout=2).score("```python\ndef add(a, b):\n    while True:\n        pass\n```", ADD) is False


def test_mbpp_program_runs_imports_code_and_tests():
    task = tasks.get("mbpp")
    example = Example(
        "Write a function to find the square root.",
        "",
        meta={"test": "assert root(16) == 4\n", "test_list": ["assert root(16) == 4"], "test_imports": ["import math"]},
    )
    assert "assert root(16) == 4" in task.prompt(example)
    assert task.score("```python\ndef root(x):\n    return math.isqrt(x)\n```", example)
    assert not task.score("```python\ndef root(x):\n    return x\n```", example)


def test_load_local_jsonl_and_csv_with_a_field_mapping(tmp_path):
    jsonl = tmp_path / "gsm.jsonl"
    rows = [{"q": "1+1?", "a": "two #### 2", "id": 7}, {"q": "2+2?", "a": "four #### 4", "id": 8}]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = tasks.get("gsm8k").load(jsonl, fields={"question": "q", "answer": "a"})
    assert [(e.question, e.answer) for e in examples] == [("1+1?", "2"), ("2+2?", "4")]
    assert examples[0].meta == {"a": "two #### 2", "id": 7}
    assert len(tasks.get("gsm8k").load(jsonl, fields={"question": "q", "answer": "a"}, limit=1)) == 1

    csv = tmp_path / "math.csv"
    csv.write_text('problem,solution\n"Half of 1?","It is $\\boxed{\\frac{1}{2}}$."\n')
    (example,) = tasks.get("math").load(csv)
    assert example.answer == "\\frac{1}{2}" and tasks.get("math").score("\\boxed{0.5}", example)


def test_missing_field_names_the_field_the_file_and_the_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: missing field 'answer' \(column 'answer'\); columns: \['question', 'solution'\]"):
        tasks.get("gsm8k").load(path)
    with pytest.raises(DataError, match=r"no field\(s\) \['anwser'\]"):
        tasks.get("gsm8k").load(path, fields={"anwser": "solution"})
    with pytest.raises(DataError, match="does not exist"):
        tasks.get("gsm8k").load(tmp_path / "absent.jsonl")


def test_relay_is_deterministic_and_has_many_values():
    senders = ("strategist", "extractor")
    first = relay.generate(300, seed=3, senders=senders)
    assert first == relay.generate(300, seed=3, senders=senders)
    assert first != relay.generate(300, seed=4, senders=senders)
    assert len({e.answer for e in first}) >= 100
    assert len(relay.CITIES) >= 20 and all(len(values) >= 100 for _, _, values in relay.KINDS.values())
    for example in first:
        assert set(example.contexts) == set(senders)
        assert example.answer in example.contexts[example.meta["holder"]]
        assert example.meta["entity"] in example.question


def test_relay_split_keeps_test_facts_out_of_training():
    train, test = relay.split(0, n_train=2000, n_test=300, senders=("a", "b", "c"))
    assert len(train) == 2000 and len(test) == 300
    test_facts = {fact for e in test for fact in e.meta["facts"]}
    assert not test_facts & {fact for e in train for fact in e.meta["facts"]}
    assert tasks.get("relay").load(split="test", limit=5) == tasks.get("relay").load(split="test")[:5]
    every_password = {(city, word) for city in relay.CITIES for word in relay.WORDS}
    with pytest.raises(DataError, match="covers almost every fact"):
        relay.generate(1, seed=0, kinds=("password",), exclude=every_password)


def test_relay_scorer_and_corpus():
    task = tasks.get("relay")
    example = Example("What is the secret code of Lisbon?", "482")
    assert task.score("482.", example) and task.score("**482**", example)
    assert task.score("The secret code of Lisbon is 482.", example)  # a real model's sentence
    assert not task.score("The code is 483", example) and not task.score("", example)
    assert not task.score("It is 482 or 117.", example)  # two values
    assert not task.score("The secret code of Lisbon is not 482.", example)  # negated
    assert not task.score("It isn't 482.", example) and not task.score("No, 482 is not it.", example)
    assert task.score("Lisbon's secret code is 482, noted in the document.", example)  # "noted" is no "no"
    assert task.score("Willow!", Example("What is the password of Oslo?", "willow"))
    assert task.extract("The password of Oslo is willow, code 482.") == "willow, 482"
    words = set(" ".join(relay.corpus()).replace(".", " ").replace("?", " ").split())
    assert {"482", "willow", "Lisbon", "password"} <= words


def test_relay_documents_hold_the_fact_once_and_confusable_ones_elsewhere():
    senders = ("left", "right")
    train, test = relay.split(0, n_train=300, n_test=100, senders=senders, format="documents", facts=4)
    assert not {f for e in test for f in e.meta["facts"]} & {f for e in train for f in e.meta["facts"]}
    task = tasks.get("relay")
    for example in test:
        entity, holder = example.meta["entity"], example.meta["holder"]
        (other,) = set(senders) - {holder}
        asked = task.target(example)  # the fact's own sentence
        assert asked.endswith(f" {example.answer}.") and asked in example.contexts[holder]
        assert sum(asked in doc for doc in example.contexts.values()) == 1
        assert all(doc.count(". ") == 3 for doc in example.contexts.values())  # 4 facts each
        kind = example.meta["kind"]
        other_kind = next(k for k in relay.KINDS if k != kind)
        assert relay.KINDS[other_kind][0].format(entity=entity, value="")[:-2] in example.contexts[other]
        assert example.contexts[other].count(relay.KINDS[kind][0].split("{entity}")[0]) >= 1
        assert task.prompt(example).endswith("Answer in one sentence.")
    assert len({e.meta["holder"] for e in test}) == 2


def test_relay_scorer_rejects_distractors_and_two_values():
    task = tasks.get("relay")
    (example,) = relay.generate(1, seed=5, senders=("left", "right"), format="documents")
    answer, entity = example.answer, example.meta["entity"]
    distractors = [v for _, v in example.meta["facts"] if v != answer]
    assert task.score(task.target(example), example)
    assert task.score(f"Sure! The answer is {answer}.", example)
    for wrong in distractors:
        assert not task.score(f"The value for {entity} is {wrong}.", example)
        assert not task.score(f"It is {answer}, or maybe {wrong}.", example)
    assert not task.score(f"{entity} has no such value.", example)


@pytest.mark.parametrize(("options", "message"), [
    ({"format": "essay"}, "unknown relay format 'essay'; formats: toy, documents"),
    ({"format": "documents", "facts": 1}, "relay facts per document must be 2 to 16, got 1"),
])
def test_relay_bad_format_options(options, message):
    with pytest.raises(DataError, match=re.escape(message)):
        relay.generate(1, seed=0, **options)


def test_hub_loading_reads_every_mmlu_subject_and_wraps_failures(monkeypatch):
    import datasets

    def fake_load(source, config, split):
        if source == "broken/set":
            raise ConnectionError("offline")
        rows = [{"question": f"{config} {i}?", "choices": ["x", "y"], "answer": i % 2} for i in range(3)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda source: ["algebra", "virology"])
    examples = tasks.get("mmlu").load(limit=4)
    assert [(e.meta["config"], e.answer) for e in examples] == [
        ("algebra", "A"), ("algebra", "B"), ("algebra", "A"), ("virology", "A")
    ]
    assert len(tasks.get("mmlu").load(config="virology")) == 3
    with pytest.raises(DataError, match="cannot load 'broken/set' for task 'gsm8k': offline"):
        tasks.get("gsm8k").load("broken/set")


def test_extract_reads_a_reply_as_score_does_when_given_the_example():
    mmlu = tasks.get("mmlu")
    example = Example("Which is a fruit?", "B", meta={"choices": ["carrot", "apple", "leek", "kale"]})
    reply = "The answer is apple."
    assert mmlu.score(reply, example) and mmlu.extract(reply, example) == "B"
    assert mmlu.extract(reply) == ""  # without the choices, the text names no letter
    relay_task = tasks.get("relay")
    doc_example = Example("What is the password of Oslo?", "zq7", meta={"facts": [("Oslo", "zq7"), ("Rome", "572")]})
    assert relay_task.extract("The password of Oslo is zq7.", doc_example) == "zq7"
    assert relay_task.extract("The password of Oslo is zq7.") == ""
