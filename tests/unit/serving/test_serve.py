"""tflow serve: a real server on 127.0.0.1 (ephemeral port), driven by the official openai client."""

import asyncio
import copy
import dataclasses
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from types import SimpleNamespace

import openai
import pytest
import torch
from conftest import perturb
from helpers import KEY, client, sample, serving
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import tflow
from tflow.channels import receiver_part as kv_part
from tflow.channels.latent import part as latent_part
from tflow.cli import app as cli
from tflow.config.recipe import load_recipe
from tflow.lora.peft_format import base_model_name
from tflow.serving.app import served_channels
from tflow.serving.server import bind, listen

LONG = "What is the secret code of Lisbon?"  # decodes 400 tokens without an EOS (checked where used)
DOC = "The secret code of Lisbon is 482."


@pytest.fixture(scope="module")
def team(tiny_checkpoint):
    overrides, ckpt = tiny_checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from more, and the server's thread shares them
    yield tflow.load(load_recipe("recipes/tiny.yaml", overrides), ckpt)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_team(tiny_checkpoint, tmp_path_factory):
    """The tiny team with every trained part: the generator, a kv LoRA and latent links (not zero)."""
    overrides, ckpt = tiny_checkpoint
    folder = tmp_path_factory.mktemp("full") / "ckpt"
    shutil.copytree(ckpt, folder)
    team = tflow.load(load_recipe("recipes/tiny.yaml", overrides), ckpt)
    perturb(team.receiver.kv_lora, seed=2, std=0.2)
    kv_part.save(team.receiver.kv_lora, folder, "kv", "kv", team.recipe, base_model_name(team.receiver.model))
    latent_part.save(team.receiver.links, folder, latent_part.fingerprint(team.senders, team.receiver),
                          team.recipe)
    return tflow.load(load_recipe("recipes/tiny.yaml", overrides), folder)


def offline(team, query, channel="weights", max_tokens=8, contexts=None):
    return team.communicate(query, channel=channel, max_new_tokens=max_tokens,
                            contexts=[contexts] if contexts else None)


def raw(url, path, body=None, key=KEY, method=None):
    """(status, headers, JSON body) of one plain HTTP request; `body` bytes are sent as they are."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def streamed(stream):
    """Text per choice, finish reason per choice, the ledger per choice and the usage of a stream."""
    texts, reasons, ledgers, usage = {}, {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
                ledgers[choice.index] = choice.model_extra["tflow"]
    return texts, reasons, ledgers, usage


# (model, messages, max_tokens, contexts, stream): lengths, budgets and channels differ on purpose
REQUESTS = [
    ("weights", [{"role": "user", "content": LONG}], 6, {}, False),
    ("weights", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 3, {}, False),
    ("weights", [{"role": "user", "content": "one two three four five six seven eight nine"}], 8, {}, True),
    ("weights", [{"role": "user", "content": "What is the code?"}], 5, {"reader": DOC}, False),
    ("weights", [{"role": "user", "content": [{"type": "text", "text": "number fact"}]}], 7, {}, True),
    ("weights", [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "the answer is"}], 4, {}, False),
    ("none", [{"role": "user", "content": LONG}], 6, {}, False),
    ("none", [{"role": "user", "content": "Hi"}], 3, {}, True),
    ("text", [{"role": "user", "content": "What is the code?"}], 4, {"reader": DOC}, False),
]
QUERIES = [LONG, "Be brief.\n\nHi", "one two three four five six seven eight nine", "What is the code?",
           "number fact", "the answer is", LONG, "Hi", "What is the code?"]


def test_concurrent_requests_answer_exactly_as_offline_and_share_batches(team):
    with serving(team, max_batch=16, max_wait_ms=300) as (url, metrics):
        api = client(url)

        def ask(request):
            channel, messages, max_tokens, contexts, stream = request
            out = api.chat.completions.create(model=f"tflow-{channel}", messages=messages, max_tokens=max_tokens,
                                              stream=stream, extra_body={"tflow": {"contexts": contexts}})
            if stream:
                texts, reasons, ledgers, _ = streamed(out)
                return texts[0], reasons[0], ledgers[0]
            return out.choices[0].message.content, out.choices[0].finish_reason, out.choices[0].model_extra["tflow"]

        with ThreadPoolExecutor(len(REQUESTS) * 2) as pool:
            answers = list(pool.map(ask, REQUESTS * 2))
    for (channel, _, max_tokens, contexts, _), query, (text, reason, ledger) in zip(
            REQUESTS * 2, QUERIES * 2, answers, strict=True):
        alone = offline(team, query, channel, max_tokens, contexts)
        assert (text, reason) == (alone.text, alone.finish_reason)
        assert ledger["usage"]["by_agent"] == asdict(alone.usage)["by_agent"]
        assert ledger["delta_applied"] == alone.delta_applied and ledger["channel"] == channel
    rows = {"weights": 12, "none": 4, "text": 2}
    for channel, n in rows.items():  # every row ran in exactly one batch of its own channel
        assert sample(metrics, "tflow_batch_size_sum", channel=channel) == n
        assert sample(metrics, "tflow_requests_total", channel=channel, status="200") == n
    assert sample(metrics, "tflow_batch_size_count", channel="weights") < rows["weights"]  # batched


def test_kv_and_latent_parts_are_served_and_answer_as_offline(full_team):
    assert served_channels(full_team) == ["none", "text", "weights", "kv", "latent", "context"]
    team = dict(senders=full_team.senders, receiver=full_team.receiver, recipe=full_team.recipe)
    assert served_channels(SimpleNamespace(**team, trained=frozenset())) == ["none", "text", "kv", "context"]
    apart = [dataclasses.replace(s, model=copy.deepcopy(s.model)) for s in full_team.senders]  # no shared KV cache
    assert served_channels(SimpleNamespace(**{**team, "senders": apart}, trained=frozenset({"weights"}))) == [
        "none", "text", "weights", "context"]
    queries = [LONG, "Hi", "one two three four five six seven eight nine", "What is the code?"]
    with serving(full_team, served_channels(full_team), max_batch=8, max_wait_ms=300) as (url, metrics):
        api = client(url)

        def ask(job):
            channel, query, stream = job
            out = api.chat.completions.create(model=f"tflow-{channel}", messages=[{"role": "user", "content": query}],
                                              max_tokens=5, stream=stream,
                                              extra_body={"tflow": {"contexts": {"reader": DOC}}})
            if stream:
                texts, reasons, ledgers, _ = streamed(out)
                return texts[0], reasons[0], ledgers[0]
            return out.choices[0].message.content, out.choices[0].finish_reason, out.choices[0].model_extra["tflow"]

        jobs = [(c, q, i % 2 == 0) for c in ("kv", "latent") for i, q in enumerate(queries)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        assert [m.id for m in api.models.list()] == [f"tflow-{c}" for c in served_channels(full_team)]
        # The receiver's prompt fits its context of 512 alone, not on top of the reader's trace.
        long = json.dumps({"messages": [{"role": "user", "content": "code " * 100}], "max_tokens": 5})
        assert raw(url, "/v1/chat/completions", long.replace("{", '{"model": "tflow-weights", ', 1).encode())[0] == 200
        status, _, body = raw(url, "/v1/chat/completions", long.replace("{", '{"model": "tflow-kv", ', 1).encode())
        assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
        assert "exceeds its context of 512 tokens" in body["error"]["message"]
    for (channel, query, _), (text, reason, ledger) in zip(jobs, answers, strict=True):
        alone = offline(full_team, query, channel, 5, {"reader": DOC})
        assert (text, reason) == (alone.text, alone.finish_reason) and ledger["channel"] == channel
        assert ledger["usage"]["by_agent"] == asdict(alone.usage)["by_agent"]
        assert ledger["message_bytes"] == alone.message_bytes > 0
    for channel in ("kv", "latent"):
        assert sample(metrics, "tflow_batch_size_sum", channel=channel) == len(queries)
        assert sample(metrics, "tflow_batch_size_count", channel=channel) < len(queries)  # batched
    assert [offline(full_team, q, "kv", 5).text for q in queries] != [offline(full_team, q, "none", 5).text
                                                                      for q in queries]


def test_stream_of_n_choices_with_usage_and_ledger(team):
    alone = offline(team, "one two three", max_tokens=5)
    with serving(team) as (url, _):
        stream = client(url).chat.completions.create(
            model="tflow-weights", messages=[{"role": "user", "content": "one two three"}], max_tokens=5, n=2,
            stream=True, stream_options={"include_usage": True})
        texts, reasons, ledgers, usage = streamed(stream)
    assert texts == {0: alone.text, 1: alone.text} and reasons == {0: alone.finish_reason, 1: alone.finish_reason}
    receiver = alone.usage.by_agent["executor"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (receiver.prompt_tokens, 2 * receiver.generated_tokens)
    assert ledgers[0]["usage"]["by_agent"]["reader"]["prompt_tokens"] == alone.usage.by_agent["reader"].prompt_tokens
    assert ledgers[0]["usage"]["total_tokens"] == alone.usage.total_tokens and ledgers[0]["message_bytes"] > 0


def test_sampled_requests_never_share_a_batch_with_greedy_ones(team):
    messages = [{"role": "user", "content": "number fact"}]
    with serving(team, max_batch=16, max_wait_ms=300) as (url, metrics):
        api = client(url)
        with ThreadPoolExecutor(2) as pool:
            greedy = pool.submit(api.chat.completions.create, model="tflow-weights", messages=messages,
                                 max_tokens=6, temperature=0)
            sampled = pool.submit(api.chat.completions.create, model="tflow-weights", messages=messages,
                                  max_tokens=6, temperature=0.8, top_p=0.9, n=3)
            greedy, sampled = greedy.result(), sampled.result()
    assert greedy.choices[0].message.content == offline(team, "number fact", max_tokens=6).text
    assert [c.index for c in sampled.choices] == [0, 1, 2] and sampled.usage.completion_tokens <= 18
    assert sample(metrics, "tflow_batch_size_count", channel="weights") == 2
    assert sample(metrics, "tflow_batch_size_sum", channel="weights") == 4


def test_client_gone_mid_stream_stops_only_its_own_row(team):
    long = offline(team, LONG, max_tokens=400)
    assert long.finish_reason == "length"  # the row would run all 400 steps if nobody stopped it
    short = offline(team, "Hi", max_tokens=40)
    with serving(team, max_batch=2, max_wait_ms=10_000) as (url, metrics):
        api = client(url)

        def leave_early():
            stream = api.chat.completions.create(model="tflow-weights", messages=[{"role": "user", "content": LONG}],
                                                 max_tokens=400, stream=True)
            chunks = list(itertools.islice(stream, 3))  # the role chunk and two of text
            stream.close()
            return chunks

        def stay():
            stream = api.chat.completions.create(model="tflow-weights", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=40, stream=True)
            return streamed(stream)

        with ThreadPoolExecutor(2) as pool:
            gone, kept = pool.submit(leave_early), pool.submit(stay)
            texts, reasons, _, _ = kept.result()
            assert len(gone.result()) == 3
    assert (texts[0], reasons[0]) == (short.text, short.finish_reason)
    assert sample(metrics, "tflow_batch_size_count", channel="weights") == 1
    assert sample(metrics, "tflow_cancelled_rows_total", channel="weights") == 1
    assert sample(metrics, "tflow_generated_tokens_total", channel="weights") < 400


def test_full_queue_is_503_with_retry_after_and_the_queued_request_still_answers(team):
    with serving(team, max_batch=1, max_queue=1, max_wait_ms=0) as (url, _):
        api = client(url)
        busy = api.chat.completions.create(model="tflow-weights", messages=[{"role": "user", "content": LONG}],
                                           max_tokens=400, stream=True)
        chunks = iter(busy)
        next(chunks), next(chunks)  # its batch is decoding now
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(api.chat.completions.create, model="tflow-none",
                                 messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
            while raw(url, "/health")[2]["queue"] < 1:
                time.sleep(0.005)
            with pytest.raises(openai.APIStatusError) as full:
                api.chat.completions.create(model="tflow-none", messages=[{"role": "user", "content": "Hi"}])
            busy.close()
            assert queued.result().choices[0].message.content == offline(team, "Hi", "none", 3).text
    assert full.value.status_code == 503 and full.value.response.headers["retry-after"] == "1"
    assert full.value.body["code"] == "queue_full"


@pytest.mark.parametrize("kwargs, status, code, param", [
    (dict(model="gpt-4"), 404, "model_not_found", "model"),
    (dict(messages=[]), 400, None, "messages"),
    (dict(max_tokens=0), 400, None, "max_tokens"),
    (dict(temperature=3.5), 400, None, "temperature"),
    (dict(messages=[{"role": "system", "content": "only a system message"}]), 400, None, "messages"),
    (dict(messages=[{"role": "user", "content": "code " * 600}]), 400, "context_length_exceeded", "messages"),
    (dict(extra_body={"tflow": {"contexts": {"nobody": "x"}}}), 400, None, "tflow.contexts"),
    (dict(stop=["\n"]), 400, None, None),
    (dict(n=17), 400, None, "n"),
])
def test_bad_requests_get_openai_errors(team, kwargs, status, code, param):
    request = {"model": "tflow-weights", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **kwargs}
    with serving(team) as (url, metrics):
        api = client(url)
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(**request)
        ok = api.chat.completions.create(model="tflow-none", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3)  # still serving
    assert err.value.status_code == status
    assert set(err.value.body) == {"message", "type", "param", "code"} and err.value.body["message"]
    assert (err.value.body["code"], err.value.body["param"]) == (code, param)
    assert ok.choices[0].message.content == offline(team, "Hi", "none", 3).text
    assert sum(s.value for m in metrics.errors.collect() for s in m.samples if s.name.endswith("_total")) == 1


def test_http_level_errors_auth_and_endpoints(team):
    with serving(team) as (url, metrics):
        status, _, body = raw(url, "/v1/chat/completions", b'{"model": "tflow-none", "messages": [')
        assert (status, body["error"]["code"]) == (400, "invalid_json")
        status, _, body = raw(url, "/v1/chat/completions", b" " * 20000)
        assert (status, body["error"]["code"]) == (413, "request_too_large")
        assert raw(url, "/nope")[0] == 404 and raw(url, "/nope")[2]["error"]["type"] == "invalid_request_error"
        for path in ("/v1/models", "/metrics"):
            for key in (None, "wrong", KEY[:-1]):
                status, _, body = raw(url, path, key=key)
                assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        assert raw(url, "/health", key=None)[:3:2] == (200, {"status": "ok", "queue": 0})
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert [m.id for m in client(url).models.list()] == ["tflow-weights", "tflow-text", "tflow-none"]
        assert client(url).models.retrieve("tflow-text").id == "tflow-text"
        text = urllib.request.urlopen(urllib.request.Request(
            url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"tflow_requests", "tflow_request_errors", "tflow_batch_size", "tflow_queue_wait_seconds",
            "tflow_generated_tokens", "tflow_tokens_per_second", "tflow_queue_depth"} <= families
    assert sample(metrics, "tflow_request_errors_total", channel="unknown", code="invalid_api_key") == 7


def test_a_delta_refused_by_the_norm_guard_is_answered_without_it_and_says_so(team):
    none = offline(team, LONG, "none", 6)
    generator = team.receiver.generator
    generator.max_delta_norm = 1e-9
    try:
        with serving(team) as (url, _):
            reply = client(url).chat.completions.create(
                model="tflow-weights", messages=[{"role": "user", "content": LONG}], max_tokens=6)
    finally:
        generator.max_delta_norm = None
    ledger = reply.choices[0].model_extra["tflow"]
    assert reply.choices[0].message.content == none.text != offline(team, LONG, max_tokens=6).text
    assert ledger["delta_applied"] is False and "exceeds generator.max_delta_norm" in ledger["warnings"][0]


def test_ctrl_c_finishes_the_request_in_flight_then_exits_0(tiny_checkpoint, team):
    overrides, ckpt = tiny_checkpoint
    expected = offline(team, LONG, max_tokens=100)
    args = [sys.executable, "-m", "tflow.cli", "serve", "recipes/tiny.yaml", "--checkpoint", str(ckpt), "--port", "0",
            "--threads", "1", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "TFLOW_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = next(line for line in proc.stderr if line.startswith("serving ") or proc.poll() is not None)
        assert line.startswith("serving tflow-none, tflow-text, tflow-weights, tflow-kv, tflow-context on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split("/v1")[0]
        stream = client(url).chat.completions.create(
            model="tflow-weights", messages=[{"role": "user", "content": LONG}], max_tokens=100, stream=True)
        chunks = iter(stream)
        first = [next(chunks), next(chunks)]
        proc.send_signal(signal.SIGINT)
        texts, reasons, _, _ = streamed([*first, *chunks])
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert (texts[0], reasons[0]) == (expected.text, "length")
    err = proc.stderr.read()
    assert err.strip().endswith("stopped") and "Traceback" not in err, err


def test_connections_to_the_bound_socket_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only where the socket's proto is IPPROTO_TCP; without it Nagle's
    algorithm held each response's body behind its headers for the client's delayed ACK (40 ms)."""
    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = bind("127.0.0.1", 0)
        listen(sock)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_serve_cli_mistakes_exit_2_before_loading(tmp_path):
    taken = bind("127.0.0.1", 0)
    listen(taken)
    port = taken.getsockname()[1]
    base = ["serve", "recipes/tiny.yaml", "--set", f"model.path={tmp_path / 'model'}"]
    try:
        for extra, message in [
            (["--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: "),
            (["--port", "0", "--max-batch", "0"], "error: max_batch must be >= 1, got 0"),
            (["--port", "70000", "--max-queue", "0"], "error: port must be in 0..65535, got 70000; max_queue must"),
            (["--port", "0", "--checkpoint", str(tmp_path / "none")],
             f"error: checkpoint {tmp_path / 'none'} does not exist"),
        ]:
            result = CliRunner().invoke(cli, [*base, *extra])
            assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
            assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
    finally:
        taken.close()
    assert not (tmp_path / "model").exists()
