"""Role prefixes read from kept states: the same states as a full prefill, and when the cache is dropped."""

import copy

import pytest
import torch
from conftest import perturb, random_delta

from tflow import Sender
from tflow.agents import prefix as prefix_module
from tflow.agents.encoding import encode, token_ids
from tflow.agents.prefix import MAX_PREFIXES, common_length, prefix_text, prefixes
from tflow.backbones import tiny
from tflow.lora.patching import patched

QUERIES = ["What is the secret code of Lisbon?", "Hi", "one two three four five six seven eight nine"]
ROLES = ["You are a strategist: say how to approach the task.", "You extract knowledge.", "You are a critic."]


@pytest.fixture
def model(tok):
    """A private model per test: the prefix cache is per model object."""
    return tiny.model(tok, hidden_size=64, num_layers=2, seed=3)


@pytest.fixture
def computed(monkeypatch):
    """Count of prefixes actually prefilled (cache misses)."""
    count = {"n": 0}
    original = prefix_module._compute

    def counting(model, ids):
        count["n"] += 1
        return original(model, ids)

    monkeypatch.setattr(prefix_module, "_compute", counting)
    return count


def _senders(model, tok):
    return [Sender(model, tok, ROLES[0], name="a"), Sender(model, tok, ROLES[1], name="b", context="Lisbon: 482."),
            Sender(model, tok, ROLES[2], name="c")]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral", "gemma2", "gemma3", "phi3", "olmo2"])
def test_reused_prefixes_give_the_states_of_a_full_prefill(tok, arch):
    model = tiny.model(tok, arch=arch, hidden_size=64, num_layers=2, seed=2)
    senders = _senders(model, tok)
    # A private document for some rows makes those rows leave the sender's prefix early.
    contexts = [[None, "private", None], [None, None, "other doc"], [None, None, None]]
    full = encode(senders, QUERIES, contexts, reuse_prefixes=False)
    reused = encode(senders, QUERIES, contexts)
    assert reused.hidden.shape == full.hidden.shape
    assert torch.equal(reused.mask, full.mask)
    assert torch.equal(reused.prompt_tokens, full.prompt_tokens)
    torch.testing.assert_close(reused.hidden, full.hidden, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(reused.hidden[:, ~reused.mask]) == 0


def test_each_prefix_is_prefilled_once_and_a_warm_cache_changes_nothing(model, tok, computed):
    senders = _senders(model, tok)
    cold = encode(senders, QUERIES)
    assert computed["n"] == 3
    warm = encode(senders, QUERIES)
    assert computed["n"] == 3
    assert torch.equal(warm.hidden, cold.hidden)


def test_an_edited_weight_drops_the_cache(model, tok, computed):
    senders = _senders(model, tok)[:1]
    before = encode(senders, QUERIES)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # in place: same tensor, new values
    after = encode(senders, QUERIES)
    assert computed["n"] == 2
    assert not torch.allclose(after.hidden, before.hidden)
    torch.testing.assert_close(after.hidden, encode(senders, QUERIES, reuse_prefixes=False).hidden,
                               rtol=1e-5, atol=1e-5)


def test_a_training_or_patched_backbone_runs_the_whole_prompt(model, tok, computed):
    senders = _senders(model, tok)
    model.train()
    encode(senders, QUERIES)
    model.eval()
    with patched(model, random_delta(model, batch=1)):
        patched_states = encode(senders, QUERIES[:1])
    assert computed["n"] == 0
    assert not torch.allclose(patched_states.hidden, encode(senders, QUERIES[:1]).hidden)


def test_the_cache_keeps_at_most_max_prefixes(model, tok, computed):
    ids = [tuple(token_ids(tok, [f"role number {i}"])[0]) for i in range(MAX_PREFIXES + 1)]
    prefixes(model, ids)
    prefixes(model, ids[1:])  # the newest MAX_PREFIXES are still there
    assert computed["n"] == MAX_PREFIXES + 1
    prefixes(model, ids[:1])  # the oldest was dropped
    assert computed["n"] == MAX_PREFIXES + 2


def test_prefix_text_ends_where_the_query_begins(model, tok):
    sender = Sender(model, tok, ROLES[1], context="Lisbon: 482.")
    text = prefix_text(sender)
    assert sender.prompt("Where?").startswith(text)
    assert text.endswith("Lisbon: 482.\n\n")
    assert common_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_length([1, 2], [1, 2, 3]) == 2


def test_copies_of_a_model_keep_separate_caches(model, tok):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[1].self_attn.q_proj.weight.mul_(0.5)
    mine, theirs = Sender(model, tok, ROLES[0]), Sender(twin, tok, ROLES[0])
    encode([mine], QUERIES)
    torch.testing.assert_close(encode([theirs], QUERIES).hidden, encode([theirs], QUERIES, reuse_prefixes=False).hidden,
                               rtol=1e-5, atol=1e-5)


def test_a_document_after_the_query_is_read_after_it_and_prefixes_still_match(model, tok):
    first = Sender(model, tok, ROLES[0], name="a", context_position="after_query")
    user = first.prompt("What is the code?", "The code of Oslo is 118.").split("user\n", 1)[1]
    assert user.startswith("What is the code?\n\nThe code of Oslo is 118.")
    senders = [first, Sender(model, tok, ROLES[1], name="b", context="Lisbon: 482.", context_position="after_query")]
    contexts = [["doc one", None, "doc three"], [None, "doc two", None]]
    full = encode(senders, QUERIES, contexts, reuse_prefixes=False)
    reused = encode(senders, QUERIES, contexts)
    assert torch.equal(reused.mask, full.mask)
    assert (reused.hidden - full.hidden).abs().max() < 1e-5


def test_an_unknown_context_position_is_refused(model, tok):
    from tflow.errors import QueryError

    with pytest.raises(QueryError, match="context_position must be one of before_query, after_query, got 'middle'"):
        Sender(model, tok, ROLES[0], context_position="middle")


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma2"])
def test_generation_on_a_kept_prefix_says_what_a_full_prefill_says(tok, arch):
    from tflow.agents.generation import GenerationSettings, generate

    model = tiny.model(tok, arch=arch, hidden_size=64, num_layers=2, seed=4)
    perturb(model, seed=5, std=0.3)
    sender = Sender(model, tok, ROLES[0], context_position="after_query")
    prompts = [sender.prompt(q, doc) for q, doc in zip(QUERIES, ["doc one", "a longer private document", "x"],
                                                       strict=True)]
    settings = GenerationSettings(max_new_tokens=12)
    full = generate(model, tok, prompts, settings)
    reused = generate(model, tok, prompts, settings, reuse=prefix_text(sender))
    assert reused.texts == full.texts and reused.finish_reasons == full.finish_reasons
    assert reused.prompt_tokens == full.prompt_tokens and reused.generated_tokens == full.generated_tokens
    prefix = len(token_ids(tok, [prefix_text(sender)])[0])
    assert full.cached_tokens == [0, 0, 0] and reused.cached_tokens == [prefix] * 3
    budgets = generate(model, tok, prompts, settings, budgets=[2, 12, 5], reuse=prefix_text(sender))
    assert budgets.generated_tokens == [min(2, full.generated_tokens[0]), full.generated_tokens[1],
                                        min(5, full.generated_tokens[2])]


def test_generation_on_a_patched_or_training_model_reads_no_kept_prefix(model, tok, computed):
    from tflow.agents.generation import GenerationSettings, generate

    sender = Sender(model, tok, ROLES[0])
    prompts = [sender.prompt(q) for q in QUERIES]
    with patched(model, random_delta(model, batch=len(prompts))):
        out = generate(model, tok, prompts, GenerationSettings(max_new_tokens=4), reuse=prefix_text(sender))
    assert out.cached_tokens == [0, 0, 0] and computed["n"] == 0
    beams = generate(model, tok, prompts, GenerationSettings(max_new_tokens=4, num_beams=2), reuse=prefix_text(sender))
    assert beams.cached_tokens == [0, 0, 0] and computed["n"] == 0
