"""The latent channel (RecursiveMAS): thoughts through links, spliced into the receiver's prompt."""

import copy

import pytest
import torch
from conftest import perturb
from helpers import Tokens, links_for

from tflow import Receiver, Sender, communicate
from tflow.agents import trace as trace_module
from tflow.agents.encoding import token_ids
from tflow.agents.prefix import prefix_text
from tflow.backbones import tiny
from tflow.channels.latent.links import InnerLink, Links, OuterLink, inner_loss
from tflow.channels.latent.run import SLOT, receiver_turn, spliced
from tflow.errors import ChannelError, QueryError

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]


@pytest.fixture(scope="module")
def narrow(tok):
    """A sender backbone of another width (32) than the receiver's (64)."""
    model = tiny.model(tok, hidden_size=32, num_layers=2, seed=4)
    perturb(model, seed=5, std=0.3)
    return model


@pytest.fixture
def team(lively, tok):
    senders = [
        Sender(lively, tok, "You are a strategist.", name="strategist"),
        Sender(lively, tok, "You extract knowledge.", name="extractor", context="The secret code of Lisbon is 482."),
    ]
    receiver = Receiver(lively, tok, "You are the executor.", name="executor")
    receiver.links = links_for(senders, receiver)
    return senders, receiver


def ask(senders, receiver, queries, channel="latent", **options):
    stream = Tokens()
    replies = communicate(senders, receiver, queries, channel=channel, max_new_tokens=6, stream=stream, **options)
    return replies, [stream.rows[i] for i in range(len(queries))]


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_query_gets_the_same_tokens_and_usage_alone_or_in_a_batch(team, rounds):
    senders, receiver = team
    batch, tokens = ask(senders, receiver, QUERIES, latent_steps=3, rounds=rounds)
    for q, query in enumerate(QUERIES):
        alone, alone_tokens = ask(senders, receiver, [query], latent_steps=3, rounds=rounds)
        assert alone_tokens[0] == tokens[q]
        assert alone[0].usage == batch[q].usage and alone[0].message_bytes == batch[q].message_bytes
    _, none = ask(senders, receiver, QUERIES, channel="none")
    assert tokens != none


def test_senders_of_another_width_talk_through_their_outer_links(lively, narrow, tok):
    senders = [Sender(narrow, tok, "You extract knowledge.", name="reader", context="The code is 482."),
               Sender(lively, tok, "You are a strategist.", name="strategist")]
    receiver = Receiver(lively, tok, "You are the executor.", name="executor")
    receiver.links = links_for(senders, receiver)
    assert receiver.links.outer[0].residual.weight.shape == (64, 32)
    batch, tokens = ask(senders, receiver, QUERIES, latent_steps=2, rounds=2)
    assert [ask(senders, receiver, [q], latent_steps=2, rounds=2)[1][0] for q in QUERIES] == tokens


def test_the_ledger_counts_every_pass_and_the_vectors_sent(team, tok):
    senders, receiver = team
    steps, q = 4, QUERIES[0]
    one = communicate(senders, receiver, q, channel="latent", latent_steps=steps, max_new_tokens=3)
    prompts = [len(token_ids(tok, [s.prompt(q)])[0]) for s in senders]
    turn = receiver_turn(receiver, q, [s.name for s in senders])
    assert turn.count(SLOT) == len(senders)  # each sender's thoughts where its text message would be
    receiver_tokens = sum(map(len, token_ids(tok, turn.split(SLOT))))
    for sender, n in zip(senders, prompts, strict=True):
        usage = one.usage.by_agent[sender.name]
        assert (usage.prompt_tokens, usage.generated_tokens, usage.latent_positions) == (n, 0, steps - 1)
    executor = one.usage.by_agent["executor"]
    assert (executor.prompt_tokens, executor.latent_positions) == (receiver_tokens, 2 * steps)
    assert one.message_bytes == 2 * steps * 64 * 4  # two senders' thoughts, width 64, float32
    two = communicate(senders, receiver, q, channel="latent", latent_steps=steps, rounds=2, max_new_tokens=3)
    first = two.usage.by_agent["strategist"]
    turn = senders[0].prompt(f"{q}\n\nLatent thoughts from executor: {SLOT}")
    assert first.prompt_tokens == prompts[0] + sum(map(len, token_ids(tok, turn.rsplit(SLOT, 1))))
    assert first.latent_positions == 2 * (steps - 1) + steps  # two rollouts, the second reads the feedback
    assert two.usage.by_agent["extractor"] == one.usage.by_agent["extractor"]  # its thoughts are kept
    assert two.usage.by_agent["executor"].prompt_tokens == 2 * receiver_tokens
    assert two.usage.by_agent["executor"].latent_positions == 2 * (2 * steps) + steps - 1
    assert two.message_bytes == (2 * steps + steps + steps) * 64 * 4  # + the new first message, + feedback


@pytest.mark.parametrize("rounds", [1, 2])
def test_senders_read_their_roles_from_kept_prefixes_and_say_the_same(team, tok, monkeypatch, rounds):
    senders, receiver = team
    reused, tokens = ask(senders, receiver, QUERIES, latent_steps=3, rounds=rounds)
    monkeypatch.setattr(trace_module, "reusable", lambda model: False)  # every prompt runs whole
    full, full_tokens = ask(senders, receiver, QUERIES, latent_steps=3, rounds=rounds)
    assert tokens == full_tokens
    roles = [len(token_ids(tok, [prefix_text(s)])[0]) for s in senders]
    rollouts = [rounds, 1]  # the first sender reads the receiver's feedback in a rollout a round
    for a, b in zip(reused, full, strict=True):
        for sender, role, n in zip(senders, roles, rollouts, strict=True):
            usage, whole = a.usage.by_agent[sender.name], b.usage.by_agent[sender.name]
            assert (usage.cached_tokens, whole.cached_tokens) == (n * role, 0)
            assert (usage.prompt_tokens, usage.latent_positions) == (whole.prompt_tokens, whole.latent_positions)
        assert a.usage.by_agent["executor"] == b.usage.by_agent["executor"]


def test_links_have_the_published_shapes_and_inner_loss_is_zero_at_a_fit():
    inner, outer = InnerLink(8, 4), OuterLink(8, 6, 4)
    x = torch.randn(3, 5, 8)
    assert inner(x).shape == (3, 5, 8) and outer(x).shape == (3, 5, 6)
    y = inner(x).detach()
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert inner_loss(inner, x, y, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert inner_loss(inner, x, -y, mask).item() > 2.0


def test_links_start_at_the_embeddings_scale_and_outer_links_of_one_width_at_the_identity(lively, narrow):
    links = Links([64, 32], 64).match_embeddings([lively, narrow], lively)
    rms = [m.get_input_embeddings().weight.pow(2).mean().sqrt().item() for m in (lively, narrow)]
    assert links.inner[0].norm_out.weight.unique().tolist() == pytest.approx([rms[0]])
    assert links.inner[1].norm_out.weight.unique().tolist() == pytest.approx([rms[1]])
    assert links.outer[1].norm_out.weight.unique().tolist() == pytest.approx([rms[0]])
    assert links.feedback.norm_out.weight.unique().tolist() == pytest.approx([rms[0]])
    x = torch.randn(2, 3, 64)
    expected = torch.nn.functional.layer_norm(x, (64,)) * rms[0]
    assert torch.allclose(links.outer[0](x), expected, atol=1e-5)  # same width: the identity, rescaled


def test_bad_inputs_are_one_line_errors(team, lively, tok):
    senders, receiver = team
    with pytest.raises(QueryError, match=r"latent_steps must be an integer >= 0, got -2"):
        communicate(senders, receiver, "Hi", channel="latent", latent_steps=-2)
    with pytest.raises(QueryError, match=r"rounds must be an integer >= 1, got 0"):
        communicate(senders, receiver, "Hi", channel="latent", rounds=0)
    bare = Receiver(lively, tok, "You are the executor.", name="executor")
    with pytest.raises(ChannelError, match=r"needs trained links.*tflow train RECIPE train.channel=latent"):
        communicate(senders, bare, "Hi", channel="latent")
    blind = copy.deepcopy(lively)
    blind.get_input_embeddings = lambda: None
    with pytest.raises(ChannelError, match=r"strategist's backbone \(Qwen3ForCausalLM\) gives none"):
        communicate([Sender(blind, tok, "You read.", name="strategist")], receiver, "Hi", channel="latent")


def test_a_slot_marker_typed_into_a_query_stays_text(team, tok):
    senders, receiver = team
    q = f"What does {SLOT} mean?"
    one = communicate(senders, receiver, q, channel="latent", latent_steps=2, max_new_tokens=3)
    turn = receiver_turn(receiver, q, [s.name for s in senders])
    pieces = turn.rsplit(SLOT, len(senders))
    assert SLOT in pieces[0]  # the query's own marker
    executor = one.usage.by_agent["executor"]
    assert (executor.prompt_tokens, executor.latent_positions) == (sum(map(len, token_ids(tok, pieces))), 2 * 2)


def test_a_text_with_too_few_slots_is_refused(lively, tok):
    thoughts = torch.zeros(1, 4, lively.config.hidden_size)
    with pytest.raises(ChannelError, match=r"text 0 has 1 thought slot\(s\) .* where 2 are needed"):
        spliced(lively, tok, [f"one {SLOT} only"], thoughts, slots=2)
