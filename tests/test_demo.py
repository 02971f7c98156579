import json

from tflow.demo import DemoSettings, message, run_demo
from tflow.tasks import relay


def test_shortened_demo_runs_end_to_end_and_reports_every_channel(tmp_path):
    settings = DemoSettings(hidden_size=32, pretrain_steps=4, train_steps=2, eval_limit=6, batch_size=8)
    lines = []
    report = run_demo(tmp_path, settings, progress=False, say=lines.append)
    assert [line[:5] for line in lines[:4]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "generator", "model", "predictions.jsonl", "report.json", "report.md", "report.png"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert report["task"] == "relay" and report["n"] == 6
    assert list(report["channels"]) == ["none", "text", "weights"]
    for channel in report["channels"].values():
        assert 0.0 <= channel["accuracy"] <= 1.0
        assert channel["tokens"]["total"] > 0 and channel["seconds"] > 0
    assert report["channels"]["weights"]["message_bytes"] > 0
    assert (tmp_path / "generator" / "generator.safetensors").is_file()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 18


def test_reader_message_states_the_fact_and_the_answer():
    ex = relay.generate(1, 3)[0]
    note = message(ex)
    assert ex.contexts["reader"].removesuffix(".").split(" is ")[0].lower() in note.lower()
    assert note.endswith(f"So the answer to the question is {ex.answer}.")
