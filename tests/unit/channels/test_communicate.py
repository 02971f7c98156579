"""tflow.communicate: the weights channel alone and batched, budgets, streams, the ledger and restoration."""

import copy

import pytest
import torch
from conftest import hypernet, two_senders

import tflow
from tflow import LoRADelta, Receiver, Sender, communicate
from tflow.agents.encoding import encode
from tflow.channels import text_turn
from tflow.channels.weights.part import build as build_hypernetwork
from tflow.config.recipe import load_recipe
from tflow.errors import ChannelError, QueryError
from tflow.lora.patching import slot

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]


@pytest.fixture
def team(qwen, tok):
    senders = two_senders(qwen, tok)
    receiver = Receiver(qwen, tok, "You are the executor.", generator=hypernet(qwen, 2), name="executor")
    return senders, receiver


def test_fresh_generator_answers_exactly_like_none(team):
    senders, receiver = team
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=8)
    weights = communicate(senders, receiver, QUERIES, channel="weights", max_new_tokens=8)
    assert [r.text for r in weights] == [r.text for r in none]
    assert all(r.channel == "weights" and r.message_bytes > 0 for r in weights)


@pytest.mark.parametrize("kind", ["mlp", "param_tokens"])
def test_query_alone_equals_query_in_batch_and_differs_from_none(team, kind, qwen):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, kind=kind, seed=1)
    batch = communicate(senders, receiver, QUERIES, max_new_tokens=8)
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=8)
    for i, q in enumerate(QUERIES):
        alone = communicate(senders, receiver, q, max_new_tokens=8)
        assert alone.text == batch[i].text
        assert alone.usage == batch[i].usage
    assert [r.text for r in batch] != [r.text for r in none]


def test_per_query_budgets_and_a_stream_leave_every_row_as_it_is_alone(team, qwen, tok):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=1)
    budgets, seen = [3, 8, 5], {}

    class Stream:  # a tflow.agents.generation.RowStream that stops row 2 after its second token
        def update(self, row, tokens, finish_reason):
            seen[row] = (list(tokens), finish_reason)

        def cancelled(self, row):
            return row == 2 and len(seen.get(2, ([], None))[0]) >= 2

    batch = communicate(senders, receiver, QUERIES, max_new_tokens=budgets, stream=Stream())
    for q in (0, 1):
        alone = communicate(senders, receiver, QUERIES[q], max_new_tokens=budgets[q])
        assert (batch[q].text, batch[q].usage, batch[q].finish_reason) == (alone.text, alone.usage, alone.finish_reason)
        tokens, reason = seen[q]
        assert (tok.decode(tokens, skip_special_tokens=True).strip(), reason) == (alone.text, alone.finish_reason)
    assert batch[2].finish_reason == "cancelled" and batch[2].usage.by_agent["executor"].generated_tokens == 2
    assert batch[2].text == tok.decode(seen[2][0], skip_special_tokens=True).strip()


def test_usage_equals_independent_counts(team, tok, qwen):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=2)
    reply = communicate(senders, receiver, QUERIES[0], max_new_tokens=8)
    expected = {s.name: len(tok(s.prompt(QUERIES[0]), add_special_tokens=False).input_ids) for s in senders}
    prompt = tok(receiver.prompt(QUERIES[0]), add_special_tokens=False, return_tensors="pt").input_ids
    delta = receiver.generator(encode(senders, [QUERIES[0]]))
    with tflow.patched(qwen, delta), torch.no_grad():
        out = qwen.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:]
    ends = (out == tok.eos_token_id).nonzero()
    generated = int(ends[0, 0]) + 1 if len(ends) else len(out)
    assert reply.text == tok.decode(out[:generated], skip_special_tokens=True).strip()
    by = reply.usage.by_agent
    assert {n: by[n].prompt_tokens for n in expected} == expected
    assert all(by[n].generated_tokens == 0 for n in expected)
    assert by["executor"].prompt_tokens == prompt.shape[1]
    assert by["executor"].generated_tokens == generated
    assert reply.usage.total_tokens == sum(expected.values()) + prompt.shape[1] + generated
    assert set(reply.timings) == {"senders", "generator", "receiver"}
    assert all(t > 0 for t in reply.timings.values())


def test_receiver_restored_after_communicate_and_after_failure(team, tok, qwen, monkeypatch):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=3)
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        before = qwen(**ids).logits
    communicate(senders, receiver, QUERIES[:2], max_new_tokens=4)
    assert torch.equal(qwen(**ids).logits, before)

    original = qwen.generate

    def failing(*args, **kwargs):
        qwen(input_ids=kwargs["input_ids"])  # runs patched, then fails mid-generation
        raise RuntimeError("device lost")

    monkeypatch.setattr(qwen, "generate", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        communicate(senders, receiver, QUERIES[0], max_new_tokens=4)
    monkeypatch.setattr(qwen, "generate", original)
    assert slot(qwen).delta is None
    with torch.no_grad():
        assert torch.equal(qwen(**ids).logits, before)


def test_one_forward_per_distinct_sender_backbone(qwen, tok):
    other, receiver_model = copy.deepcopy(qwen), copy.deepcopy(qwen)
    calls = {"shared": 0, "other": 0}
    handles = [qwen.base_model.register_forward_hook(lambda *a: calls.__setitem__("shared", calls["shared"] + 1)),
               other.base_model.register_forward_hook(lambda *a: calls.__setitem__("other", calls["other"] + 1))]
    senders = [Sender(qwen, tok, "A"), Sender(qwen, tok, "B"), Sender(other, tok, "C")]
    receiver = Receiver(receiver_model, tok, generator=hypernet(receiver_model, 3, seed=4))
    try:
        communicate(senders, receiver, QUERIES, max_new_tokens=2)
        assert calls == {"shared": 3, "other": 2}  # each role prefix once, then one forward per backbone
        calls.update(shared=0, other=0)
        communicate(senders, receiver, QUERIES, max_new_tokens=2)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"shared": 1, "other": 1}


def test_generator_sees_no_padded_positions(team, qwen, tok):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=5)
    seen = {}
    handle = receiver.generator.generator.register_forward_hook(lambda m, args, out: seen.update(cond=args[0], mask=args[1]))
    communicate(senders, receiver, QUERIES, max_new_tokens=2)
    handle.remove()
    cond, mask = seen["cond"], seen["mask"]
    assert cond.shape[0] == len(senders) * len(QUERIES)
    assert torch.count_nonzero(cond[~mask]) == 0
    expected = [len(tok(s.prompt(q), add_special_tokens=False).input_ids) for s in senders for q in QUERIES]
    assert mask.sum(-1).tolist() == expected


def test_text_channel_receiver_reads_exactly_the_messages(team, tok):
    senders, receiver = team
    text = communicate(senders, receiver, QUERIES[0], channel="text", max_new_tokens=4, message_tokens=5)
    none = communicate(senders, receiver, QUERIES[0], channel="none", max_new_tokens=4)
    assert list(text.messages) == ["strategist", "extractor"]
    framed = receiver.prompt(text_turn(QUERIES[0], text.messages))
    count = len(tok(framed, add_special_tokens=False).input_ids)
    assert text.usage.by_agent["executor"].prompt_tokens == count
    assert count > none.usage.by_agent["executor"].prompt_tokens
    for name in ("strategist", "extractor"):
        assert 1 <= text.usage.by_agent[name].generated_tokens <= 5
    # the second sender read the first one's message
    second = senders[1].prompt(text_turn(QUERIES[0], {"strategist": text.messages["strategist"]}))
    assert text.usage.by_agent["extractor"].prompt_tokens == len(tok(second, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(channel="smoke"), ChannelError, "unknown channel 'smoke'; choose one of: none, text, weights"),
    (dict(query=""), QueryError, "non-empty string"),
    (dict(query=[]), QueryError, "non-empty string"),
    (dict(max_new_tokens=0), QueryError, "max_new_tokens must be > 0, got 0"),
    (dict(max_new_tokens=[4, 4]), QueryError, "got 2 max_new_tokens for 1 queries; give one or one per query"),
    (dict(max_new_tokens=[0]), QueryError, "max_new_tokens must be > 0, got 0"),
    (dict(query="code " * 600), QueryError, "exceeds the model's context of 512"),
    (dict(contexts={"nobody": "a document"}), QueryError, r"contexts name \['nobody'\], not a sender of this team"),
    (dict(query=["Hi", "Yo"], contexts={"strategist": "doc"}), QueryError, "got a mapping for 2 queries"),
    (dict(contexts=["a document"]), QueryError, "a context must map a sender name to a document, got str"),
])
def test_bad_calls_raise_typed_errors(team, kwargs, error, match):
    senders, receiver = team
    query = kwargs.pop("query", "Hi")
    with pytest.raises(error, match=match):
        communicate(senders, receiver, query, **kwargs)


def test_a_single_query_takes_a_lone_context_mapping(team):
    senders, receiver = team
    name = senders[0].name
    lone = communicate(senders, receiver, "Hi", channel="text", max_new_tokens=4, message_tokens=4,
                       contexts={name: "The code of Lisbon is 7."})
    listed = communicate(senders, receiver, "Hi", channel="text", max_new_tokens=4, message_tokens=4,
                         contexts=[{name: "The code of Lisbon is 7."}])
    plain = communicate(senders, receiver, "Hi", channel="text", max_new_tokens=4, message_tokens=4)
    assert lone.usage == listed.usage != plain.usage


def test_weights_channel_without_generator_is_an_error(team):
    senders, receiver = team
    receiver.generator = None
    with pytest.raises(ChannelError, match="needs a generator"):
        communicate(senders, receiver, "Hi")


def poison(delta, row):
    """`delta` with one NaN in row `row` of its first module's A."""
    name = next(iter(delta.factors))
    a = delta.factors[name][0].clone()
    a[row, 0, 0] = float("nan")
    return LoRADelta({**delta.factors, name: (a, delta.factors[name][1])}, delta.scale)


def test_non_finite_delta_row_is_not_applied_and_the_reply_says_so(team, qwen):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=1)
    clean = communicate(senders, receiver, QUERIES, max_new_tokens=4)
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=4)
    assert all(c.text != n.text for c, n in zip(clean, none, strict=True))  # every delta changes its answer
    handle = receiver.generator.register_forward_hook(lambda module, args, delta: poison(delta, 1))
    try:
        replies = communicate(senders, receiver, QUERIES, max_new_tokens=4)
    finally:
        handle.remove()
    assert replies[1].text == none[1].text
    assert replies[1].delta_applied is False
    assert replies[1].warnings == ["the generated delta is not finite (NaN or inf); answered without it"]
    for q in (0, 2):
        assert replies[q].text == clean[q].text and replies[q].delta_applied and not replies[q].warnings
    assert all(r.delta_applied is None and not r.warnings for r in none)


def test_delta_above_max_delta_norm_is_not_applied(team, qwen):
    senders, receiver = team
    receiver.generator = hypernet(qwen, 2, seed=1)
    clean = communicate(senders, receiver, QUERIES, max_new_tokens=4)
    none = communicate(senders, receiver, QUERIES, channel="none", max_new_tokens=4)
    norms = receiver.generator(encode(senders, QUERIES)).row_norms().tolist()
    bound = sorted(norms)[1] * 1.001  # between the second-largest and the largest norm
    receiver.generator.max_delta_norm = bound
    replies = communicate(senders, receiver, QUERIES, max_new_tokens=4)
    for q, norm in enumerate(norms):
        if norm > bound:
            assert replies[q].text == none[q].text and replies[q].delta_applied is False
            assert replies[q].warnings == [f"the generated delta's norm {norm:.4g} exceeds "
                                           f"generator.max_delta_norm {bound:g}; answered without it"]
        else:
            assert replies[q].text == clean[q].text and replies[q].delta_applied and not replies[q].warnings
    assert sum(r.delta_applied is False for r in replies) == 1


def test_recipe_max_delta_norm_reaches_the_generator(qwen, tok):
    recipe = load_recipe({"model": {"path": "tiny"}, "senders": [{"name": "a", "role": "A."}],
                          "generator": {"kind": "mlp", "d_model": 32, "depth": 1, "heads": 2, "max_delta_norm": 2.5}})
    senders = [Sender(qwen, tok, "A.", name="a")]
    assert build_hypernetwork(recipe, senders, Receiver(qwen, tok)).max_delta_norm == 2.5


def test_tflow_communicate_is_the_function_whatever_was_imported_first():
    import tflow.team  # noqa: F401  (a module that uses communicate)

    assert tflow.communicate is communicate and callable(tflow.communicate)
