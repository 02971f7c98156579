"""tflow curves: a metric of several runs' metrics.csv against step, plotted and tabled; bad runs refused in one line."""

import pytest
from typer.testing import CliRunner

from tflow.cli import app
from tflow.errors import DataError
from tflow.evaluation.curves import labels_for, read_curve, table

HEADER = "epoch,step,train_loss,val_accuracy,val_loss\n"


def run(tmp_path, name, rows):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "metrics.csv").write_text(HEADER + "".join(f"0,{r}\n" for r in rows))
    return folder


def test_reads_the_rows_that_logged_the_metric_in_order(tmp_path):
    folder = run(tmp_path, "a", ["0,,0.1,2.0", "9,1.5,,", "9,,0.25,1.0", "19,,0.5,0.5"])
    assert read_curve(folder, "val_accuracy") == [(0, 0.1), (9, 0.25), (19, 0.5)]
    assert read_curve(folder / "metrics.csv", "val_loss") == [(0, 2.0), (9, 1.0), (19, 0.5)]
    assert read_curve(folder, "train_loss") == [(9, 1.5)]


def test_missing_file_or_metric_is_refused_naming_what_the_run_has(tmp_path):
    with pytest.raises(DataError, match="no metrics.csv; give a training run's folder"):
        read_curve(tmp_path, "val_accuracy")
    folder = run(tmp_path, "b", ["0,,,2.0", "9,1.5,,"])
    with pytest.raises(DataError, match=r"no 'val_accuracy' logged; it has train_loss, val_loss \(val_accuracy is "
                                        r"logged by runs with train.val_answers > 0\)"):
        read_curve(folder, "val_accuracy")


def test_labels_default_to_folder_names_and_must_match_the_runs(tmp_path):
    a, b = run(tmp_path, "ce", ["0,,0,1"]), run(tmp_path, "distill", ["0,,0,1"])
    assert labels_for([a, b / "metrics.csv"], None) == ["ce", "distill"]
    assert labels_for([a, b], ["x", "y"]) == ["x", "y"]
    with pytest.raises(DataError, match="1 --label for 2 runs"):
        labels_for([a, b], ["x"])


def test_table_gives_first_last_and_best_per_run():
    curves = {"ce": [(0, 0.0), (29, 0.5), (59, 0.25)], "distill": [(0, 0.0), (29, 0.75)]}
    assert table(curves, "val_accuracy").splitlines()[2:] == [
        "| ce | 0.000 @ 0 | 0.250 @ 59 | 0.500 @ 29 |", "| distill | 0.000 @ 0 | 0.750 @ 29 | 0.750 @ 29 |"]
    assert "| ce | 0.000 @ 0 | 0.250 @ 59 | 0.000 @ 0 |" in table(curves, "val_loss")  # a loss is best at its minimum


def test_cli_writes_the_png_and_prints_the_table_or_one_line_error(tmp_path):
    a, b = run(tmp_path, "ce", ["0,,0.0,2", "29,,0.5,1"]), run(tmp_path, "distill", ["0,,0.0,2", "29,,0.75,1"])
    out = tmp_path / "plots" / "relay.png"
    done = CliRunner().invoke(app, ["curves", str(a), str(b), "--label", "perceiver ce", "--label", "perceiver distill",
                                    "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "| perceiver distill | 0.000 @ 0 | 0.750 @ 29 | 0.750 @ 29 |" in done.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = CliRunner().invoke(app, ["curves", str(a), "--metric", "val_kl", "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 2 and done.output.count("\n") == 1 and "no 'val_kl' logged" in done.output
    assert not (tmp_path / "x.png").exists()
