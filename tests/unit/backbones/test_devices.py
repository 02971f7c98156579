"""Devices and dtypes checked against the machine: one line naming what exists and the fix, over the
CLI (exit 2) and the API (DeviceError), before any weights load."""

import pytest
import torch
from typer.testing import CliRunner

import tflow
from tflow.backbones import devices
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import DeviceError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, as `devices` sees it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def cli(tmp_path, *args):
    result = CliRunner().invoke(app, ["ask", "recipes/tiny.yaml", "Hi", "--channel", "none",
                                      f"model.path={tmp_path}/model", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1
    return result.stderr.strip()


def test_auto_is_the_first_gpu_else_the_cpu(one_gpu, monkeypatch):
    assert devices.resolve("auto") == torch.device("cuda:0") == devices.resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu") and devices.present()[0] == "cpu"


def test_a_gpu_index_that_does_not_exist_names_the_ones_that_do(one_gpu):
    with pytest.raises(DeviceError) as info:
        devices.resolve("cuda:3", "receiver.model.device")
    assert str(info.value) == ("receiver.model.device 'cuda:3': no such device here; devices present: cpu, cuda:0 "
                               "(set receiver.model.device: cuda:0 or cpu or auto)")


def test_agents_on_different_devices_are_refused(one_gpu, tmp_path):
    (tmp_path / "model").mkdir()
    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", "model.device=cpu",
                                               f"receiver.model={{path: {tmp_path}/model, device: cuda:0}}"])
    with pytest.raises(DeviceError, match=r"the agents run on one device, but the recipe puts them on several "
                                          r"\(model.device -> cpu, receiver.model.device -> cuda:0\)"):
        devices.agents_device(recipe)


@no_cuda
def test_cuda_where_there_is_none_exits_2_naming_the_devices_present(tmp_path):
    assert cli(tmp_path, "model.device=cuda") == ("error: model.device 'cuda': CUDA is not available here; devices "
                                                  "present: cpu (set model.device: cpu or auto)")


def test_a_missing_gpu_index_exits_2(tmp_path):
    assert cli(tmp_path, "model.device=cuda:99").startswith("error: model.device 'cuda:99': ")
    with pytest.raises(DeviceError, match="devices present: cpu"):
        tflow.load(load_recipe("recipes/tiny.yaml", [f"model.path={tmp_path}/model", "model.device=cuda:99"]))


def test_a_dtype_the_cpu_cannot_compute_in_exits_2_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_fails", lambda device, dtype: "RuntimeError: no bfloat16 kernels")
    assert cli(tmp_path, "model.dtype=bfloat16") == (
        "error: model.dtype 'bfloat16': cpu cannot compute in bfloat16 here (RuntimeError: no bfloat16 kernels); "
        "set model.dtype: float32")
    assert not (tmp_path / "model").exists()  # refused before anything was built


def test_a_precision_the_cpu_cannot_train_in_exits_2_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_fails", lambda device, dtype: "RuntimeError: no bfloat16 kernels")
    result = CliRunner().invoke(app, ["train", "recipes/tiny.yaml", f"model.path={tmp_path}/model",
                                      f"train.out_dir={tmp_path}/out", "train.precision=bf16-mixed", "--no-progress"])
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == (
        "error: train.precision 'bf16-mixed': cpu cannot compute in bfloat16 here (RuntimeError: no bfloat16 "
        "kernels); set train.precision: 32")


def test_fsdp_without_cuda_exits_2_with_lightnings_reason(tmp_path):
    result = CliRunner().invoke(app, ["train", "recipes/tiny.yaml", f"model.path={tmp_path}/model",
                                      f"train.out_dir={tmp_path}/out", "train.strategy=fsdp", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(
        "error: train: Lightning cannot run strategy='fsdp', accelerator='cpu', devices=1 here (The strategy `fsdp` "
        "requires a GPU accelerator")


def test_the_cpu_computes_in_every_dtype_a_recipe_names():
    for dtype in devices.DTYPES.values():
        devices.check_dtype(dtype, torch.device("cpu"), "model.dtype", "set model.dtype: float32")
