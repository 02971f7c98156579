"""The kv channel (DiffMAS; LatentMAS untrained): a shared KV trace, exact under batching."""

import copy

import pytest
import torch
from conftest import two_senders
from helpers import Tokens

from tflow import Receiver, Sender, communicate
from tflow.agents import trace as trace_module
from tflow.agents.encoding import token_ids
from tflow.agents.generation import GenerationSettings, kv_cache_bytes
from tflow.agents.prefix import prefix_text
from tflow.backbones.families import ReceiverSpec
from tflow.channels.kv.run import aligner, build_trace
from tflow.channels.registry import Call
from tflow.errors import ChannelError, QueryError
from tflow.lora.receiver_lora import ReceiverLoRA

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]


@pytest.fixture
def team(lively, tok):
    senders = two_senders(lively, tok)
    return senders, Receiver(lively, tok, "You are the executor.", name="executor")


def ask(senders, receiver, queries, channel="kv", **options):
    stream = Tokens()
    replies = communicate(senders, receiver, queries, channel=channel, max_new_tokens=6, stream=stream, **options)
    return replies, [stream.rows[i] for i in range(len(queries))]


def reference_logits(senders, receiver, query, steps):
    """LatentMAS for one query without any padding: plain forwards on one growing cache."""
    model, tok = receiver.model, receiver.tokenizer
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    cache = None
    with torch.no_grad():
        for sender in senders:
            ids = torch.tensor(token_ids(tok, [sender.prompt(query)]))
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            for _ in range(steps):
                h = out.hidden_states[-1][:, -1:]
                out = model(inputs_embeds=h * target / h.norm(dim=-1, keepdim=True), past_key_values=cache,
                            use_cache=True, output_hidden_states=True)
        ids = torch.tensor(token_ids(tok, [receiver.prompt(query)]))
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]


@pytest.mark.parametrize("steps", [0, 3])
def test_batched_trace_equals_latentmas_on_one_unpadded_query(team, steps):
    senders, receiver = team
    call = Call(senders, receiver, QUERIES, GenerationSettings(), ["strategist", "extractor"], None,
                options={"latent_steps": steps, "realign": False})
    with torch.no_grad():
        trace = build_trace(call)[0]
        seqs = token_ids(receiver.tokenizer, [receiver.prompt(q) for q in QUERIES])
        logits = trace.append_ids(seqs, receiver.tokenizer.pad_token_id, full=True).logits[:, -1]
    for q, query in enumerate(QUERIES):
        torch.testing.assert_close(logits[q], reference_logits(senders, receiver, query, steps), atol=1e-5, rtol=0)


def test_a_query_gets_the_same_tokens_and_usage_alone_or_in_a_batch(team):
    senders, receiver = team
    batch, tokens = ask(senders, receiver, QUERIES)
    for q, query in enumerate(QUERIES):
        alone, alone_tokens = ask(senders, receiver, [query])
        assert alone_tokens[0] == tokens[q]
        assert alone[0].usage == batch[q].usage and alone[0].message_bytes == batch[q].message_bytes
    _, none = ask(senders, receiver, QUERIES, channel="none")
    assert tokens != none  # the trace changes what the receiver says


def test_the_ledger_counts_latent_steps_and_the_trace_bytes(team, tok, lively):
    senders, receiver = team
    reply = communicate(senders, receiver, QUERIES[0], channel="kv", latent_steps=4, max_new_tokens=4)
    prompts = [len(token_ids(tok, [s.prompt(QUERIES[0])])[0]) for s in senders]
    for sender, n in zip(senders, prompts, strict=True):
        usage = reply.usage.by_agent[sender.name]
        assert (usage.prompt_tokens, usage.generated_tokens, usage.latent_positions) == (n, 0, 4)
        assert usage.total_tokens == n + 4 and usage.kv_cache_bytes == kv_cache_bytes(lively, n + 4)
    assert reply.usage.latent_positions == 8
    assert reply.message_bytes == kv_cache_bytes(lively, sum(prompts) + 8)
    assert reply.channel == "kv" and reply.usage.by_agent["executor"].latent_positions == 0


def test_the_first_sender_reads_its_role_from_a_kept_prefix_and_the_trace_stays_the_same(team, tok, monkeypatch):
    senders, receiver = team
    call = Call(senders, receiver, QUERIES, GenerationSettings(), ["strategist", "extractor"], None,
                options={"latent_steps": 2, "realign": False})
    with torch.no_grad():
        reused, counts, cached = build_trace(call)
        monkeypatch.setattr(trace_module, "reusable", lambda model: False)  # every prompt runs whole
        full, full_counts, none = build_trace(call)
    role = len(token_ids(tok, [prefix_text(senders[0])])[0])
    assert cached == [role] * len(QUERIES) and none == [0] * len(QUERIES) and counts == full_counts
    assert reused.lengths() == full.lengths()
    for row, whole in zip(reused.rows_kv(), full.rows_kv(), strict=True):
        for (k, v), (k_full, v_full) in zip(row, whole, strict=True):
            torch.testing.assert_close(k, k_full, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, v_full, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    reply = communicate(senders, receiver, QUERIES[0], channel="kv", max_new_tokens=4)
    first, second = (reply.usage.by_agent[s.name] for s in senders)
    assert (first.cached_tokens, second.cached_tokens) == (role, 0)  # the second's turn follows the first's
    assert reply.usage.processed_tokens == reply.usage.total_tokens - role


def test_realignment_is_near_identity_for_tied_embeddings(qwen):
    h = torch.randn(5, qwen.config.hidden_size)
    plain, realigned = aligner(qwen, False)(h), aligner(qwen, True)(h)
    target = qwen.get_input_embeddings().weight.norm(dim=-1).mean()
    torch.testing.assert_close(plain.norm(dim=-1), target.expand(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(realigned, plain, atol=1e-3, rtol=0)


def test_a_trained_lora_changes_the_answer_and_stays_batch_invariant(team, lively):
    senders, receiver = team
    _, plain = ask(senders, receiver, QUERIES)
    lora = ReceiverLoRA(ReceiverSpec.from_model(lively, ["q_proj", "v_proj"]), rank=2, alpha=4)
    assert lora.is_zero()
    receiver.kv_lora = lora
    _, fresh = ask(senders, receiver, QUERIES)
    assert fresh == plain  # zero B: exactly LatentMAS
    with torch.no_grad():
        for b in lora.b:
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    _, trained = ask(senders, receiver, QUERIES)
    assert trained != plain
    assert [ask(senders, receiver, [q])[1][0] for q in QUERIES] == trained


def test_bad_inputs_are_one_line_errors(team, tok):
    senders, receiver = team
    with pytest.raises(QueryError, match=r"latent_steps must be an integer >= 0, got -1"):
        communicate(senders, receiver, "Hi", channel="kv", latent_steps=-1)
    with pytest.raises(QueryError, match="needs num_beams 1"):
        communicate(senders, receiver, "Hi", channel="kv", num_beams=2)
    other = Sender(copy.deepcopy(senders[0].model), tok, "You read.", name="reader")
    with pytest.raises(ChannelError, match=r"sender 'reader' has its own: drop senders.1.model"):
        communicate([senders[0], other], receiver, "Hi", channel="kv")
