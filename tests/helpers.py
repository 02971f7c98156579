"""Helpers several test files share: batches and logits, a token-keeping stream, links, peft loading, a server."""

import copy
import threading
import time
import warnings
from contextlib import contextmanager

import torch
from openai import OpenAI
from peft import PeftModel

from tflow.channels.latent.links import Links
from tflow.serving.app import ServeSettings, create_app
from tflow.serving.server import bind, listen, uvicorn_server

PROMPTS = ["The answer is 12.", "What is the secret code of the city", "Hi", "one two three four five six"]


def batch(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


class Tokens:
    """A RowStream that keeps every row's generated token ids (special tokens included)."""

    def __init__(self):
        self.rows = {}

    def update(self, row, tokens, finish_reason):
        self.rows[row] = list(tokens)

    def cancelled(self, row):
        return False


def links_for(senders, receiver, seed=0):
    torch.manual_seed(seed)
    return Links([s.model.config.hidden_size for s in senders], receiver.model.config.hidden_size, hidden=16)


def peft_model(team, adapter, tied=False):
    """PeftModel.from_pretrained on a copy of the receiver, with every warning an error: peft only
    warns about keys it cannot place, and the adapter then silently does nothing there. With
    `tied`, peft's warning that a target shares its weight with the embeddings is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        if tied:
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer is part")
        return PeftModel.from_pretrained(copy.deepcopy(team.receiver.model), str(adapter)).eval()


KEY = "s3cret"


@contextmanager
def serving(team, channels=("weights", "text", "none"), **options):
    """A server for `team` on a free loopback port, in a thread: yields (base url, its Metrics)."""
    app = create_app(team, list(channels),
                     ServeSettings(**{"api_key": KEY, "max_body_bytes": 16384, "max_wait_ms": 5, **options}))
    sock = bind("127.0.0.1", 0)
    url = listen(sock)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.005)
        yield url, app.state.metrics
    finally:
        server.should_exit = True
        thread.join()


def client(url, key=KEY):
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0
