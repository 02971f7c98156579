"""Faults: interrupts restore the receiver, a killed training keeps its checkpoints, threads never mix deltas."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from conftest import hypernet
from typer.testing import CliRunner

import tflow
from tflow import Receiver, Sender, communicate
from tflow.cli import app
from tflow.io import read_safetensors
from tflow.lora.patching import slot

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]


@pytest.fixture
def team(qwen, tok):
    senders = [Sender(qwen, tok, "You are a strategist.", name="strategist"),
               Sender(qwen, tok, "You extract knowledge.", name="extractor")]
    return senders, Receiver(qwen, tok, "You are the executor.", generator=hypernet(qwen, 2, seed=1), name="executor")


def test_keyboard_interrupt_mid_generation_restores_the_receiver_bit_exactly(team, qwen, tok, monkeypatch):
    senders, receiver = team
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        before = qwen(**ids).logits
    expected = communicate(senders, receiver, QUERIES, max_new_tokens=4)
    seen = {}

    def interrupted(*args, **kwargs):
        seen["patched"] = qwen(input_ids=kwargs["input_ids"]).logits  # runs with the delta in, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        communicate(senders, receiver, QUERIES, max_new_tokens=4)
    monkeypatch.undo()
    assert slot(qwen).delta is None
    with torch.no_grad():
        assert torch.equal(qwen(**ids).logits, before)
    again = communicate(senders, receiver, QUERIES, max_new_tokens=4)  # no lock is left held
    assert [r.text for r in again] == [r.text for r in expected]


def test_threads_on_one_receiver_get_the_answers_of_serial_calls(team):
    senders, receiver = team
    serial = [communicate(senders, receiver, q, max_new_tokens=4).text for q in QUERIES]
    none = [communicate(senders, receiver, q, channel="none", max_new_tokens=4).text for q in QUERIES]
    assert serial != none and len(set(serial)) == len(serial)  # each query's delta shows in its answer
    jobs = [q for q in QUERIES for _ in range(2)]
    answers: list[str | None] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = communicate(senders, receiver, jobs[i], max_new_tokens=4).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [serial[QUERIES.index(q)] for q in jobs]


def rewriting(out) -> bool:
    """Whether a checkpoint is being rewritten now: its temp file sits beside the previous version."""
    finals = [out / "generator.safetensors", out / "lightning" / "last.ckpt"]
    return any(f.exists() and any(f.parent.glob(f".{f.name}.*.tmp")) for f in finals)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_finishes(tmp_path):
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    recipe = {
        "model": {"path": f"{tmp_path}/model", "device": "cpu", "tiny": tiny},
        "senders": [{"name": "reader", "role": "Read."}],
        "generator": {"kind": "mlp", "rank": 2, "d_model": 16, "depth": 1, "heads": 2},
        "data": {"task": "relay", "relay": {"n_train": 64, "n_test": 4}},
        "train": {"max_steps": 8, "batch_size": 4, "val_every": 1, "log_every": 1, "accelerator": "cpu",
                  "devices": 1, "out_dir": f"{tmp_path}/out"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(tmp_path / "log", "w") as log:
        run = subprocess.Popen([sys.executable, "-m", "tflow.cli", "train", str(path), "--no-progress"],
                               stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 300
        while run.poll() is None and not rewriting(out) and time.monotonic() < deadline:
            time.sleep(0.0005)  # every checkpoint is rewritten each step; its temp file lives a few ms
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-3000:]
    for file in out.rglob("*.safetensors"):
        read_safetensors(file)
    torch.load(out / "lightning" / "last.ckpt", weights_only=True)
    assert tflow.load(path, checkpoint=out).receiver.generator is not None

    resumed = CliRunner().invoke(app, ["train", str(path), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "done: 8 steps" in resumed.stdout
    assert torch.load(out / "lightning" / "last.ckpt", weights_only=True)["global_step"] == 8
    tflow.load(path, checkpoint=out)
