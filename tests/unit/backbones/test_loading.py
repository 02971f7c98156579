"""load_backbone with model.tiny: the build is announced, and a path shaped like a hub id is refused."""

import pytest

from tflow.backbones import tiny
from tflow.backbones.loading import load_backbone, looks_like_hub_id
from tflow.config.sections import ModelSection
from tflow.errors import ModelLoadError

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


@pytest.mark.parametrize(("path", "hub"), [
    ("Qwen/Qwen3-0.6B", True), ("models/tiny", True), ("org/my_model.v2", True),
    ("./models/tiny", False), ("../models/tiny", False), ("/tmp/models/tiny", False), ("~/tiny", False),
    ("runs/models/tiny", False), ("tiny", False),
])
def test_hub_id_shape(path, hub):
    assert looks_like_hub_id(path) is hub


def test_a_tiny_build_is_announced_and_marked_random(tmp_path, capsys):
    path = tmp_path / "model"
    model, _ = load_backbone(ModelSection(path=str(path), device="cpu", tiny=TINY))
    assert capsys.readouterr().err == f"building a tiny random qwen3 model at {path}\n"
    assert tiny.is_random(model) and model.config.hidden_size == 32
    load_backbone(ModelSection(path=str(path), device="cpu", tiny=TINY))
    assert capsys.readouterr().err == ""  # the folder exists: loaded, not built again


@pytest.mark.parametrize("path", ["Qwen/Qwen3-0.6B", "models/tiny"])
def test_a_tiny_build_at_a_hub_id_shaped_path_is_refused(tmp_path, monkeypatch, capsys, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_backbone(ModelSection(path=path, device="cpu", tiny=TINY), "senders.0.model")
    assert str(err.value) == (
        f"senders.0.model.path: {path!r} looks like a hub id, but senders.0.model.tiny builds a random model there; "
        "give a local folder such as ./models/tiny, or set senders.0.model.tiny=null to load the hub model")
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


def test_a_local_looking_relative_path_builds_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_backbone(ModelSection(path="./models/tiny", device="cpu", tiny=TINY))
    assert (tmp_path / "models" / "tiny" / "config.json").is_file()
