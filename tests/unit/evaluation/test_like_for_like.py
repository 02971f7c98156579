"""benchmarks/like_for_like.py: a new seed's evals carry seed 0's recipe keys, so `tflow aggregate`
pools them with the committed seed-0 reports; finished steps are skipped."""

import importlib.util
import json
from pathlib import Path

import pytest

from tflow.config.recipe import load_recipe
from tflow.evaluation.aggregate import _check_same

ROOT = Path(__file__).resolve().parents[3]
SPEC = importlib.util.spec_from_file_location("like_for_like", ROOT / "benchmarks" / "like_for_like.py")
like = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(like)
SEED0 = {"relay": {"A": "s0-A", "B": "s0-B", "C": "s0-C", "D": "s0-ablations"},
         "category": {"A": "s0-A", "B": "s0-B", "C": "s0-C", "D": "s0-D"}}


def overrides(args: list[str]) -> list[str]:
    """The key=value overrides of an eval's arguments: between the recipe and the first flag."""
    return args[1:args.index("--channels")]


@pytest.mark.parametrize("task", ["relay", "category"])
def test_each_eval_group_matches_seed_0s_report(task, tmp_path):
    parts = tmp_path / "parts"
    for name, args in like.evals(task, parts, 1).items():
        report = json.loads((ROOT / "docs" / "reports" / f"smollm2-{task}-{SEED0[task][name]}" / "report.json").read_text())
        if args[0].startswith("recipes/"):
            recipe = load_recipe(ROOT / args[0], overrides(args))
        else:  # the run's own recipe.yaml: what `tflow train` writes after the queue's trainings
            recipe = load_recipe(ROOT / f"recipes/smollm2-{task}.yaml",
                                 [*like.TRAIN, f"train.out_dir={parts}", "seed=1", *overrides(args)])
        provenance = report["provenance"]
        ours = {**report, "provenance": {**provenance, "recipe": {**provenance["recipe"], "resolved": recipe.to_dict()}}}
        _check_same(f"seed 0's {name}", report, f"seed 1's {name}", ours)  # raises naming a recipe key that differs
        assert args[args.index("--channels") + 1].split(",") == [c for c in report["channels"] if "@" not in c]


def test_finished_steps_are_skipped_and_the_rest_printed(tmp_path, capsys):
    out = tmp_path / "s1"
    (out / "parts" / "none-run").mkdir(parents=True)
    (out / "parts" / "none-run" / "steps.json").write_text('{"global_step": 100}')
    like.main(["category", "1", str(out), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train-none: done already")
    assert len(lines) == 9 and "train.channel=kv" in lines[1] and lines[-1].endswith(f"--out {out}/eval-D")
    with pytest.raises(SystemExit, match="usage"):
        like.main(["gsm8k", "1", str(out)])
