"""Ablations of the kv and latent channels: replayed messages, their edits, and eval rows."""

import pytest
import torch
from conftest import two_senders
from helpers import Tokens, links_for

from tflow import Receiver, communicate
from tflow.channels import registry
from tflow.channels.kv.ablations import ablate_kv, kv_messages, mean_trace
from tflow.channels.latent.ablations import ablate_latent, latent_messages
from tflow.errors import AblationError, ChannelError, QueryError
from tflow.evaluation.ablations import derangement, parse_ablations

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]
SETTINGS = {"kv": dict(latent_steps=2, realign=False), "latent": dict(latent_steps=3, rounds=1)}
COLLECT = {"kv": kv_messages, "latent": latent_messages}


@pytest.fixture
def team(lively, tok):
    senders = two_senders(lively, tok)
    receiver = Receiver(lively, tok, "You are the executor.", name="executor")
    receiver.links = links_for(senders, receiver)
    return senders, receiver


def tokens(senders, receiver, queries, channel, **options):
    stream = Tokens()
    replies = communicate(senders, receiver, queries, channel=channel, max_new_tokens=6, stream=stream,
                          **SETTINGS[channel], **options)
    return replies, [stream.rows[i] for i in range(len(queries))]


@pytest.mark.parametrize("channel", ["kv", "latent"])
def test_a_replayed_message_answers_exactly_as_the_channel_does(team, channel):
    senders, receiver = team
    own, own_tokens = tokens(senders, receiver, QUERIES, channel)
    messages = COLLECT[channel](senders, receiver, QUERIES, batch_size=2, **SETTINGS[channel])
    replay = messages.rows if channel == "kv" else messages.thoughts
    again, again_tokens = tokens(senders, receiver, QUERIES, channel, message=replay)
    assert again_tokens == own_tokens
    assert [r.message_bytes for r in again] == [r.message_bytes for r in own]
    assert set(again[0].usage.by_agent) == {"executor"}  # the senders did not run
    assert again[0].usage.by_agent["executor"] == own[0].usage.by_agent["executor"]


@pytest.mark.parametrize("channel", ["kv", "latent"])
def test_shuffled_answers_each_query_with_its_donors_message(team, channel):
    senders, receiver = team
    messages = COLLECT[channel](senders, receiver, QUERIES, **SETTINGS[channel])
    ablate = ablate_kv if channel == "kv" else ablate_latent
    shuffled = ablate(messages, ["shuffled"])["shuffled"]
    _, own = tokens(senders, receiver, QUERIES, channel)
    order = derangement(len(QUERIES))
    for q, donor in enumerate(order):  # query q's receiver prompt, donor's message
        replay = shuffled[q:q + 1]
        _, got = tokens(senders, receiver, [QUERIES[q]], channel, message=replay)
        given = messages.rows[donor:donor + 1] if channel == "kv" else messages.thoughts[donor:donor + 1]
        _, expected = tokens(senders, receiver, [QUERIES[q]], channel, message=given)
        assert got == expected
    assert order != list(range(len(QUERIES)))


def test_drop_sender_rebuilds_the_trace_without_that_sender(team):
    senders, receiver = team
    messages = kv_messages(senders, receiver, QUERIES, ablations=["drop-sender"], **SETTINGS["kv"])
    rows = ablate_kv(messages, ["drop-sender"])
    assert set(rows) == {"drop-sender:strategist", "drop-sender:extractor"}
    alone = kv_messages(senders[1:], receiver, QUERIES, **SETTINGS["kv"])
    for got, expected in zip(rows["drop-sender:strategist"], alone.rows, strict=True):
        for (k, v), (k2, v2) in zip(got, expected, strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    _, kept = tokens(senders, receiver, QUERIES, "kv", message=rows["drop-sender:strategist"])
    _, only = tokens(senders[1:], receiver, QUERIES, "kv")
    assert kept == only


def test_latent_drop_sender_removes_its_block_and_static_is_the_mean(team):
    senders, receiver = team
    messages = latent_messages(senders, receiver, QUERIES, **SETTINGS["latent"])
    thoughts = messages.thoughts
    assert thoughts.shape[:2] == (3, 2 * 3)
    rows = ablate_latent(messages, ["static", "drop-sender"])
    assert torch.equal(rows["drop-sender:strategist"], thoughts[:, 3:])
    assert torch.equal(rows["drop-sender:extractor"], thoughts[:, :3])
    assert torch.allclose(rows["static"], thoughts.mean(0, keepdim=True).expand_as(thoughts))


def test_mean_trace_aligns_traces_at_their_last_position():
    short = [(torch.ones(1, 2, 1), torch.zeros(1, 2, 1))]
    long = [(torch.full((1, 4, 1), 3.0), torch.ones(1, 4, 1))]
    (keys, values), = mean_trace([short, long])
    assert keys.flatten().tolist() == [3.0, 3.0, 2.0, 2.0]
    assert values.flatten().tolist() == [1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("channel", ["kv", "latent"])
def test_evaluate_adds_a_row_per_latent_ablation(team, channel, tok, tmp_path):
    from tflow.config.recipe import load_recipe
    from tflow.evaluation.evaluate import evaluate
    from tflow.evaluation.report import write_report
    from tflow.tasks import relay
    from tflow.team import Team

    senders, receiver = team
    recipe = load_recipe({"model": {"path": str(tmp_path)}, "senders": [{"name": s.name, "role": s.role} for s in senders],
                          "receiver": {"name": "executor"}, "generate": {"max_new_tokens": 4}})
    examples = relay.generate(3, seed=1, senders=(senders[1].name,))
    result = evaluate(Team(senders, receiver, recipe), relay.Relay(), examples, ["none", channel],
                      ablations="shuffled,static,drop-sender")
    rows = result.ablations[channel]
    assert set(rows) == {"shuffled", "static", "drop-sender:strategist", "drop-sender:extractor"}
    assert all(len(r.predictions) == 3 for r in rows.values())
    assert channel not in result.diagnostics
    assert rows["shuffled"].donor_accuracy is not None
    report = write_report(result, tmp_path / "eval")
    assert set(report["ablations"][channel]) == set(rows)
    assert (tmp_path / "eval" / "report.png").stat().st_size > 0


def test_bad_message_and_ablation_inputs_are_one_line_errors(team):
    senders, receiver = team
    with pytest.raises(ChannelError, match="the text channel takes none"):
        communicate(senders, receiver, "Hi", channel="text", message=torch.zeros(1, 1, 64))
    with pytest.raises(QueryError, match="the message has 2 rows for 1 queries"):
        communicate(senders, receiver, "Hi", channel="latent", message=torch.zeros(2, 1, 64))
    with pytest.raises(AblationError, match="ablation\\(s\\) scale run on none of the channels none, kv"):
        parse_ablations("scale", ["none", "kv"], ["a", "b"])
    assert registry.get("kv").ablations.names == registry.get("latent").ablations.names == ("shuffled", "static", "drop-sender")
