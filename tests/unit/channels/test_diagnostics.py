"""The weights channel's ablations and delta diagnostics: static, shuffled, drop-sender, scale, cosines."""

import json

import pytest
import torch
from conftest import hypernet, random_delta
from torch import nn
from typer.testing import CliRunner

from tflow import LoRADelta, Receiver, Sender, patched
from tflow.agents.encoding import encode
from tflow.backbones.families import ReceiverSpec
from tflow.channels.weights.diagnostics import (
    ablate,
    cosine_similarities,
    delta_rows,
    norms_by_layer_and_kind,
    query_specific_shares,
    sender_deltas,
    summarize,
)
from tflow.cli import app
from tflow.config.recipe import load_recipe
from tflow.errors import AblationError, ChannelError, QueryError
from tflow.evaluation.ablations import ABLATIONS, derangement, parse_ablations
from tflow.evaluation.evaluate import evaluate
from tflow.evaluation.report import write_report
from tflow.tasks import relay
from tflow.team import Team

runner = CliRunner()
SENDERS = ["reader", "scout"]


def linears(seed=0):
    """Two linear modules side by side (not chained), so each one's patched output is affine in its delta."""
    torch.manual_seed(seed)
    return nn.ModuleDict({"up": nn.Linear(6, 9), "down": nn.Linear(6, 4)})


def linear_delta(batch, rank=3, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"up": (6, 9), "down": (6, 4)}
    return LoRADelta({name: (torch.randn(batch, rank, i, generator=g), torch.randn(batch, o, rank, generator=g))
                      for name, (i, o) in shapes.items()}, scale)


def outputs(net, delta, x):
    """Each module's output on x [batch, T, 6] with `delta` patched in: {name: [batch, T, out]}."""
    with torch.no_grad(), patched(net, delta):
        return {name: module(x) for name, module in net.items()}


@pytest.fixture(scope="module")
def team(qwen, tok):
    """Two senders on the tiny model and a generator whose deltas are not zero."""
    recipe = load_recipe({"model": {"path": "tiny"}, "senders": [{"name": n, "role": f"You are the {n}."} for n in SENDERS],
                          "generator": {"kind": "mlp", "rank": 2, "d_model": 32, "depth": 1, "heads": 2},
                          "generate": {"max_new_tokens": 3}})
    senders = [Sender(qwen, tok, s.role, s.name) for s in recipe.senders]
    receiver = Receiver(qwen, tok, "Answer.", name="executor", generator=hypernet(qwen, 2, seed=3))
    return Team(senders, receiver, recipe)


@pytest.fixture(scope="module")
def examples():
    return relay.generate(6, seed=0, senders=SENDERS)


@pytest.fixture(scope="module")
def deltas(team, examples):
    task = relay.Relay()
    return sender_deltas(team.senders, team.receiver, [task.prompt(ex) for ex in examples],
                         [ex.contexts for ex in examples], batch_size=4)


def test_static_mean_patches_the_mean_of_the_per_query_outputs():
    net, delta = linears(), linear_delta(batch=4)
    x = torch.randn(1, 5, 6).expand(4, 5, 6)  # the same input for every query
    per_query = outputs(net, delta, x)
    mean = delta.mean()
    assert mean.batch_size == 1  # rank n * r, or the module's width where that is smaller
    assert all(a.shape[1] == min(4 * 3, a.shape[2], b.shape[1]) for a, b in mean.factors.values())
    static = outputs(net, mean, x)  # one row applies to every row of the batch
    for name in net:
        assert torch.allclose(static[name], per_query[name].mean(0, keepdim=True).expand_as(static[name]), atol=1e-5)


def test_static_ablation_is_the_mean_over_the_whole_evaluated_set(deltas):
    static = ablate(deltas, ["static"])["static"]
    fused = deltas.fused()
    for name, (a, b) in static.factors.items():
        fa, fb = fused.factors[name]
        assert torch.allclose((b[0] @ a[0]), (fb @ fa).mean(0), atol=1e-6)


def test_shuffled_is_a_fixed_derangement():
    for n in range(2, 40):
        order = derangement(n)
        assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
        assert derangement(n) == order  # fixed: the same set gets the same derangement
    assert derangement(30, seed=1) != derangement(30)
    with pytest.raises(AblationError, match="shuffled needs at least 2 queries"):
        derangement(1)


def test_shuffled_gives_each_query_another_querys_delta(deltas):
    shuffled, fused = ablate(deltas, ["shuffled"])["shuffled"], deltas.fused()
    order = derangement(deltas.num_queries)
    assert shuffled.batch_size == deltas.num_queries
    for name, (a, b) in delta_rows(shuffled, slice(None)).factors.items():
        assert torch.equal(a, fused.factors[name][0][order]) and torch.equal(b, fused.factors[name][1][order])


def test_shares_sum_exactly_to_the_fused_delta(team):
    states = encode(team.senders, ["What is the password of Oslo?", "Hi"])
    with torch.no_grad():
        fused, shares = team.receiver.generator(states), team.receiver.generator.shares(states)
    for name, (a, b) in LoRADelta.concat(shares).factors.items():
        assert torch.equal(a, fused.factors[name][0]) and torch.equal(b, fused.factors[name][1])


def test_drop_sender_removes_exactly_that_senders_share(deltas):
    rows = ablate(deltas, ["drop-sender"])
    assert list(rows) == ["drop-sender:reader", "drop-sender:scout"]
    fused = deltas.fused()
    for s, sender in enumerate(SENDERS):
        dropped, share = rows[f"drop-sender:{sender}"], deltas.shares[s]
        for name, (a, b) in dropped.factors.items():
            left = dropped.scale * b @ a
            expected = fused.scale * fused.factors[name][1] @ fused.factors[name][0] - share.scale * (
                share.factors[name][1] @ share.factors[name][0])
            assert torch.allclose(left, expected, rtol=1e-5, atol=1e-4)
            assert a.shape[1] == share.factors[name][0].shape[1]  # the other sender's rank only


def test_scale_two_doubles_the_delta_and_half_halves_it():
    net, delta = linears(), linear_delta(batch=3)
    x = torch.randn(3, 5, 6)
    base = outputs(net, delta.scaled(0.0), x)
    one = outputs(net, delta, x)
    for factor in (0.5, 2.0):
        scaled = outputs(net, delta.scaled(factor), x)
        for name in net:
            assert torch.allclose(scaled[name] - base[name], factor * (one[name] - base[name]), atol=1e-5)
    assert torch.allclose(delta.scaled(2.0).row_norms(), 2 * delta.row_norms())


def test_scale_rows_share_the_factors(deltas):
    rows = ablate(deltas, ["scale"])
    fused = deltas.fused()
    assert list(rows) == ["scale:0.5", "scale:2"]
    assert [rows[r].scale for r in rows] == [0.5 * fused.scale, 2 * fused.scale]


def test_cosines_and_query_specific_shares_match_dense_updates(qwen):
    delta = random_delta(qwen, batch=4, rank=2, seed=5)
    a0, b0 = next(iter(delta.factors.values()))
    twin = LoRADelta({n: (torch.cat([a, a[:1]]), torch.cat([b, -b[:1]])) for n, (a, b) in delta.factors.items()},
                     delta.scale)  # row 4 is minus row 0
    dense = torch.stack([torch.cat([(b[i] @ a[i]).flatten() for a, b in twin.factors.values()]) for i in range(5)])
    expected = nn.functional.cosine_similarity(dense[:, None], dense[None, :], dim=-1)
    cos = cosine_similarities(twin)
    assert torch.allclose(cos, expected, atol=1e-5)
    assert torch.allclose(cos.diagonal(), torch.ones(5), atol=1e-5) and abs(cos[0, 4] + 1) < 1e-5
    mean = dense.mean(0)
    shares = ((dense - mean) ** 2).sum(1) / (dense ** 2).sum(1)
    assert torch.allclose(query_specific_shares(twin), shares, atol=1e-4)
    same = LoRADelta({n: (a[:1].expand(3, -1, -1), b[:1].expand(3, -1, -1)) for n, (a, b) in delta.factors.items()})
    assert torch.allclose(query_specific_shares(same), torch.zeros(3), atol=1e-5)


def test_norms_by_layer_and_kind_place_every_module_norm(qwen):
    delta = random_delta(qwen, batch=3, seed=2)
    spec = ReceiverSpec.from_model(qwen)
    grid = norms_by_layer_and_kind(delta, spec)
    assert grid["layers"] == [0, 1] and grid["kinds"] == list(spec.targets)
    by_module = delta.module_row_norms()
    for m in spec.modules:
        cell = grid["mean_norm"][m.layer][grid["kinds"].index(m.kind)]
        assert cell == pytest.approx(by_module[m.name].mean().item())
        b, a = delta.factors[m.name][1], delta.factors[m.name][0]
        assert torch.allclose(by_module[m.name], delta.scale * torch.linalg.matrix_norm(b @ a), rtol=1e-4)
    squares = sum(n ** 2 for n in by_module.values())
    assert torch.allclose(squares.sqrt(), delta.row_norms(), rtol=1e-5)


def test_given_delta_answers_as_the_weights_channel_does(team, examples, deltas):
    task = relay.Relay()
    queries, contexts = [task.prompt(ex) for ex in examples], [ex.contexts for ex in examples]
    generated = team.communicate(queries, channel="weights", contexts=contexts)
    given = team.communicate(queries, channel="weights", delta=deltas.fused())
    assert [r.text for r in given] == [r.text for r in generated]
    assert set(given[0].usage.by_agent) == {"executor"} and "senders" not in given[0].timings
    with pytest.raises(ChannelError, match="the none channel takes none"):
        team.communicate(queries[0], channel="none", delta=deltas.fused().select([0]))
    with pytest.raises(QueryError, match="the delta has 6 rows for 2 queries"):
        team.communicate(queries[:2], channel="weights", delta=deltas.fused())


def test_one_given_row_answers_every_query_as_that_row_repeated_and_is_guarded(team, examples, deltas):
    queries = [relay.Relay().prompt(ex) for ex in examples[:3]]
    row = deltas.fused().select([0])
    one = team.communicate(queries, channel="weights", delta=row)
    assert [r.text for r in one] == [r.text for r in team.communicate(queries, channel="weights", delta=row.expand(3))]
    assert all(r.delta_applied for r in one)
    team.receiver.generator.max_delta_norm = row.row_norms().item() / 2
    try:
        refused = team.communicate(queries, channel="weights", delta=row)
    finally:
        team.receiver.generator.max_delta_norm = None
    assert [r.delta_applied for r in refused] == [False] * 3 and all("exceeds" in r.warnings[0] for r in refused)
    assert [r.text for r in refused] == [r.text for r in team.communicate(queries, channel="none")]


def test_guard_refuses_rows_over_the_bound_and_diagnostics_show_them(team, examples):
    task, generator = relay.Relay(), team.receiver.generator
    queries = [task.prompt(ex) for ex in examples]
    norms = sender_deltas(team.senders, team.receiver, queries).generated().row_norms()
    bound = float(norms.median())
    generator.max_delta_norm = bound
    try:
        deltas = sender_deltas(team.senders, team.receiver, queries, batch_size=4)
        summary = summarize(deltas, team.receiver)
    finally:
        generator.max_delta_norm = None
    assert deltas.refused.tolist() == (norms > bound).tolist() and summary["refused"] == int((norms > bound).sum())
    assert torch.equal(deltas.fused().row_norms() == 0, deltas.refused)
    assert summary["row_norms"] == pytest.approx(norms.tolist()) and summary["max_delta_norm"] == bound
    assert summary["cosine"]["queries"] == int((norms <= bound).sum())


def test_evaluate_adds_ablation_rows_and_diagnostics_independent_of_batch_size(team, examples, tmp_path):
    task = relay.Relay()
    without_copy_head = [a for a in ABLATIONS if a not in ("copy-head", "trunk")]
    runs = [evaluate(team, task, examples, ["none", "weights"], batch_size=b, ablations=without_copy_head)
            for b in (2, 4)]
    rows = ["shuffled", "static", "drop-sender:reader", "drop-sender:scout", "scale:0.5", "scale:2"]
    for result in runs:
        assert list(result.ablations) == ["weights"] and list(result.ablations["weights"]) == rows
        assert all(len(r.predictions) == len(examples) for r in result.ablations["weights"].values())
    texts = [{row: [p.reply for p in r.predictions] for row, r in result.ablations["weights"].items()} for result in runs]
    assert texts[0] == texts[1]  # static and shuffled are over the whole set, not a batch
    d = runs[0].diagnostics["weights"]
    assert d["queries"] == 6 and len(d["row_norms"]) == 6 and d["refused"] == 0
    assert len(d["norms"]["layers"]) == 2 and d["cosine"]["queries"] == 6
    assert sum(d["cosine"]["histogram"]["counts"]) == 6 * 5 // 2 and set(d["sender_norms"]) == set(SENDERS)

    report = write_report(runs[0], tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report)) and list(saved["ablations"]["weights"]) == rows
    assert saved["ablations"]["weights"]["shuffled"]["donor_accuracy"] is not None
    holders = saved["channels"]["weights"]["accuracy_by_holder"]
    assert sum(h["n"] for h in holders.values()) == 6 and set(holders) <= set(SENDERS)
    md = (tmp_path / "report.md").read_text()
    assert "## Does the message carry the query? (weights ablations)" in md and "| drop-sender:scout |" in md
    assert "## Delta diagnostics (weights)" in md and "| layer | q_proj |" in md
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sum(p["channel"] == "weights/static" for p in predictions) == 6
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_ablations_are_one_line_errors_listing_what_is_possible():
    with pytest.raises(AblationError, match=r"^unknown ablation\(s\) 'smoke'; choose from: shuffled, static, "
                                            r"drop-sender, scale, copy-head, trunk$"):
        parse_ablations("static,smoke", ["weights"], SENDERS)
    with pytest.raises(AblationError, match=r"^drop-sender needs two or more senders, and this team has one "
                                            r"\(reader\); possible here: shuffled, static, scale, copy-head, trunk$"):
        parse_ablations("drop-sender", ["none", "weights"], ["reader"])
    with pytest.raises(AblationError, match=r"^channel\(s\) none, text have no message to ablate; "
                                            r"ablations run on: weights, kv, latent"):
        parse_ablations("shuffled", ["none", "text"], SENDERS)
    assert parse_ablations(" scale, shuffled,scale ", ["none", "weights"], ["reader"]) == ["scale", "shuffled"]
    assert parse_ablations(None, ["none"], ["reader"]) == []


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "{tmp}", "--ablations", "shuffled,smoke"],
     "error: unknown ablation(s) 'smoke'; choose from: shuffled, static, drop-sender, scale"),
    (["--checkpoint", "{tmp}", "--ablations", "drop-sender"],
     "error: drop-sender needs two or more senders, and this team has one (reader); possible here: "),
    (["--ablations", "static", "--channels", "none,text"], "error: channel(s) none, text have no message to ablate"),
])
def test_eval_cli_ablation_mistakes_exit_2_with_one_line_before_loading(tmp_path, extra, message):
    args = ["eval", "recipes/tiny.yaml", f"model.path={tmp_path}/model", *[e.format(tmp=tmp_path) for e in extra]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # no traceback
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "model").exists()  # failed before building or loading any model


def test_shuffled_on_one_example_fails_before_any_channel_runs(team, examples, monkeypatch):
    monkeypatch.setattr(Team, "communicate", lambda *a, **k: pytest.fail("a channel ran"))
    with pytest.raises(AblationError, match="shuffled needs at least 2 examples"):
        evaluate(team, relay.Relay(), examples[:1], ["weights"], ablations="shuffled")


def test_diagnostics_without_ablations_cover_the_first_queries_only(team, examples, monkeypatch):
    import tflow.evaluation.evaluate as evaluation

    monkeypatch.setattr(evaluation, "DIAGNOSTIC_QUERIES", 4)
    task = relay.Relay()
    plain = evaluate(team, task, examples, ["weights"], batch_size=4)
    ablated = evaluate(team, task, examples, ["weights"], batch_size=4, ablations=["scale"])
    assert plain.diagnostics["weights"]["queries"] == 4 and len(plain.diagnostics["weights"]["row_norms"]) == 4
    assert ablated.diagnostics["weights"]["queries"] == len(examples) == 6
    assert plain.diagnostics["weights"]["row_norms"] == ablated.diagnostics["weights"]["row_norms"][:4]


def test_basis_deltas_go_through_every_check(team, examples, qwen, tok):
    from tflow.lora.basis import BasisDelta

    receiver = Receiver(qwen, tok, "Answer.", name="executor", generator=hypernet(qwen, 2, kind="basis", seed=3))
    task = relay.Relay()
    deltas = sender_deltas(team.senders, receiver, [task.prompt(ex) for ex in examples],
                           [ex.contexts for ex in examples], batch_size=4)
    fused = deltas.fused()
    assert isinstance(fused, BasisDelta) and fused.batch_size == len(examples)
    torch.testing.assert_close(cosine_similarities(fused), cosine_similarities(fused.lora()), atol=1e-5, rtol=0)
    torch.testing.assert_close(query_specific_shares(fused), query_specific_shares(fused.lora()), atol=1e-5, rtol=0)
    rows = ablate(deltas, ["shuffled", "static", "drop-sender", "scale"])
    order = derangement(len(examples))
    for name, core in fused.cores.items():
        assert torch.equal(delta_rows(rows["shuffled"], slice(None)).cores[name], core[order])
        torch.testing.assert_close(rows["static"].cores[name][0], core.mean(0))
        dropped = rows["drop-sender:reader"].cores[name]
        torch.testing.assert_close(dropped, deltas.shares[1].cores[name])  # what is left is the other sender's share
    summary = summarize(deltas, receiver)
    assert summary["cosine"]["queries"] == len(examples) and summary["refused"] == 0
    assert set(summary["sender_norms"]) == set(SENDERS)
