"""docs/extending.md stays true: every Python block on the page runs, in order, and its asserts hold."""

import re
from pathlib import Path

import pytest

import generators
from generators import registry as generator_registry
from tflow import tasks
from tflow.backbones import families
from tflow.channels import registry

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "extending.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture
def registries():
    """Whatever the page registers is removed afterwards, so other tests see the shipped registries."""
    kept = (dict(registry._CHANNELS), dict(generator_registry._REGISTRY), dict(families.FAMILIES), dict(tasks._TASKS))
    yield
    for live, saved in zip((registry._CHANNELS, generator_registry._REGISTRY, families.FAMILIES, tasks._TASKS), kept,
                           strict=True):
        live.clear()
        live.update(saved)


def test_every_example_on_the_page_runs(registries, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = blocks()
    assert len(code) == 5, "the page has an opening block and one per registry"
    namespace: dict = {}
    for block in code:
        exec(compile(block.replace("runs/models/tiny", str(tmp_path / "tiny")), str(PAGE), "exec"), namespace)
    assert {"digest"} <= set(registry.available()) and "pooled" in generators.available()
    assert "capital" in tasks.available() and "mixtral" in families.FAMILIES
