"""benchmarks/gpu_check.py: a stage that fails or overruns is recorded and the check goes on; its
smallest path (build a backbone, skip FSDP without CUDA) writes the one JSON with the card's name."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_records_failure_overrun_skip_and_figures(tmp_path):
    check = gpu_check()
    python = [sys.executable, "-c"]
    failed = check.stage("a", [*python, "raise SystemExit('boom')"], tmp_path, 60)
    assert failed["status"] == "failed" and failed["error"] == "exit 1: boom"
    late = check.stage("b", [*python, "print('started', flush=True); import time; time.sleep(60)"], tmp_path, 1)
    assert late["status"] == "timed out" and late["error"] == "ran past its 1 s; last: started"
    assert late["seconds"] < 30
    skipped = check.stage("c", "no CUDA here", tmp_path, 60)
    assert skipped["status"] == "skipped" and skipped["reason"] == "no CUDA here"
    ok = check.stage("d", [*python, "print('7')"], tmp_path, 60, read=lambda: {"seven": 7})
    assert ok["status"] == "ok" and ok["figures"] == {"seven": 7}
    unreadable = check.stage("e", [*python, "pass"], tmp_path, 60, read=lambda: json.loads(""))
    assert unreadable["status"] == "failed" and unreadable["error"].startswith("ran, but its figures could not be read")


def test_the_smallest_path_writes_one_json_with_the_card(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--stages",
                           "build,train_fsdp", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["card"]["name"] and report["shape"] == "tiny" and report["wall_s"] > 0
    assert list(report["stages"]) == ["build", "train_fsdp"]
    assert report["stages"]["build"]["status"] == "ok" and report["stages"]["build"]["figures"]["bytes"] > 0
    assert report["stages"]["train_fsdp"] == {"status": "skipped", "seconds": 0.0, "budget_s": 53,
                                              "reason": "Lightning's FSDP strategy runs on CUDA devices only"}
    assert set(report["headline"]) == {"patch_overhead_basis_batch32", "weights_vs_none", "throughput_vs_max_batch_1",
                                       "p99_vs_single"}
    assert (tmp_path / "work" / "model" / "config.json").is_file()
