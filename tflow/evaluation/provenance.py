"""Where a report came from: recipe, checkpoint, data, code and machine, as plain data for report.json.

Collecting it never fails: what cannot be read (no git, no Lightning checkpoint, no /proc/cpuinfo) is None.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import yaml


def provenance(recipe, recipe_path: str | Path, checkpoint: str | Path | None, task: str, split: str,
               split_size: int, limit: int | None) -> dict:
    """The provenance of an eval of `recipe` (a resolved `Recipe`, read from `recipe_path` plus overrides).

    `split_size` counts the split's examples before `limit` took the first ones.
    """
    from tflow import __version__

    resolved = recipe.to_yaml()
    return {
        "recipe": {"path": str(recipe_path), "sha256": hashlib.sha256(resolved.encode()).hexdigest(),
                   "resolved": recipe.to_dict()},
        "checkpoint": None if checkpoint is None else checkpoint_provenance(checkpoint),
        "task": task,
        "split": split,
        "split_size": split_size,
        "limit": limit,
        "seed": recipe.seed,
        "tflow": {"version": __version__, "commit": git_commit()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def checkpoint_provenance(checkpoint: str | Path) -> dict:
    """{"path", "steps": {channel: optimizer steps as of its run's last saved part, or None}, and the
    "seed" and "recipe_sha256" of the training run's recipe.yaml (None without one)}."""
    from tflow.channels import registry
    from tflow.errors import CheckpointError
    from tflow.training.checkpoint import RECIPE_FILE, trained_parts
    from tflow.training.loop import run_dir

    path = Path(checkpoint).resolve()
    try:
        parts = trained_parts(path)
    except CheckpointError:
        parts = {}
    out_dir = path if path.is_dir() else path.parent
    if parts and not path.is_dir():  # one part's file: its train.out_dir is where the part's path starts
        (channel,) = parts
        out_dir = path.parents[len(Path(registry.get(channel).part.file).parts) - 1]
    steps = {channel: global_step(run_dir(out_dir, channel)) for channel in parts}
    recipe = out_dir / RECIPE_FILE
    text = recipe.read_bytes() if recipe.is_file() else None
    try:
        seed = (yaml.safe_load(text) or {}).get("seed") if text is not None else None
    except (yaml.YAMLError, AttributeError):
        seed = None
    return {"path": str(checkpoint), "steps": steps, "seed": seed,
            "recipe_sha256": None if text is None else hashlib.sha256(text).hexdigest()}


def global_step(run: Path) -> int | None:
    """The optimizer steps a run had taken when it last saved its part, from its `STEPS_FILE`
    (None when it is missing or unreadable: a run from before tflow wrote one).

    Lightning's own checkpoint is a pickle: a report never reads it.
    """
    from tflow.training.loop import STEPS_FILE

    try:
        step = json.loads((run / STEPS_FILE).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):  # a report must not fail over its provenance
        return None
    return step if isinstance(step, int) else None


def git_commit() -> str | None:
    """The commit tflow's own code is at (`git rev-parse HEAD` beside the package), or None."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def machine() -> dict:
    """{"platform", "cpu" (model from /proc/cpuinfo), "torch", "torch_threads", "gpu" (CUDA device 0's name)}."""
    import torch

    return {"platform": platform.platform(), "cpu": cpu_model(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_model() -> str | None:
    """The first `model name` in /proc/cpuinfo, else `platform.processor()`, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
