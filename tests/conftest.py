"""Fixtures every test shares: tiny Qwen3-shaped models and tokenizers built locally, deltas, generators."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tflow.backbones import tiny  # noqa: E402
from tflow.channels.weights import part as weights_part

torch.set_num_threads(2)

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA device")])]
"""The devices end-to-end tests run on: the CPU always, CUDA marked `gpu` (off by default; `pytest -m
gpu` runs it, skipped where CUDA is absent)."""


@pytest.fixture(scope="session")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="session")
def qwen(tok):
    return tiny.model(tok, hidden_size=64, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def llama(tok):
    return tiny.model(tok, arch="llama", hidden_size=64, num_layers=2, seed=1)


@pytest.fixture(scope="session")
def lively(qwen):
    """The tiny Qwen3 with noisier weights, so its greedy tokens depend on what it reads."""
    import copy

    model = copy.deepcopy(qwen)
    perturb(model, seed=3, std=0.3)
    return model


def two_senders(model, tok):
    """A strategist and a knowledge extractor holding a fixed private fact, both on `model`."""
    from tflow import Sender

    return [Sender(model, tok, "You are a strategist.", name="strategist"),
            Sender(model, tok, "You extract knowledge.", name="extractor", context="The secret code of Lisbon is 482.")]


def random_delta(model, batch, rank=4, scale=0.5, seed=0, targets=None, std=0.2):
    """Random per-row factors for every targeted linear of `model`."""
    from tflow import LoRADelta, ReceiverSpec

    spec = ReceiverSpec.from_model(model, targets)
    g = torch.Generator().manual_seed(seed)
    factors = {
        m.name: (
            torch.randn(batch, rank, m.in_features, generator=g) * std,
            torch.randn(batch, m.out_features, rank, generator=g) * std,
        )
        for m in spec.modules
    }
    return LoRADelta(factors, scale=scale)


def random_basis_delta(model, batch, k=4, scale=0.5, seed=0, std=0.2):
    """A random shared basis (U [k, in], V [out, k]) and random per-row cores for every targeted linear."""
    from tflow import ReceiverSpec
    from tflow.lora.basis import BasisDelta

    spec = ReceiverSpec.from_model(model)
    g = torch.Generator().manual_seed(seed)
    basis = {m.name: (torch.randn(k, m.in_features, generator=g) * std, torch.randn(m.out_features, k, generator=g) * std)
             for m in spec.modules}
    return BasisDelta(basis, {name: torch.randn(batch, k, k, generator=g) for name in basis}, scale=scale)


def merged_copy(model, delta, row):
    """A copy of `model` with W + scale * B_row A_row merged into every delta module (any delta kind)."""
    import copy

    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    delta = delta.lora()
    with torch.no_grad():
        for name, (a, b) in delta.factors.items():
            weight = modules[name].weight
            weight += (delta.scale * b[row] @ a[row]).to(weight.device)
    return clone


def hypernet(model, num_senders, kind="mlp", seed=None, std=0.3):
    """A small hypernetwork for `model`; with `seed`, every parameter is perturbed so deltas are not zero."""
    from tflow import Hypernetwork, ReceiverSpec

    spec = ReceiverSpec.from_model(model)
    with torch.random.fork_rng():  # the same initial weights whatever ran before
        torch.manual_seed(0)
        net = Hypernetwork(spec, {"kind": kind, "rank": 2, "d_model": 32, "depth": 1, "heads": 2,
                                         "head_scale": 1.0},
                           num_senders, model.config.num_hidden_layers + 1, model.config.hidden_size)
    if seed is not None:
        perturb(net, seed, std)
    return net


def perturb(net, seed, std=0.3):
    """Add seeded Gaussian noise to every parameter of `net`, so its deltas are not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny recipe with its model in a temp folder and a generator checkpoint whose deltas are
    not zero: (recipe overrides, checkpoint folder)."""
    import tflow
    from tflow.config.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("tiny")
    overrides = [f"model.path={tmp / 'model'}", f"train.out_dir={tmp / 'train'}"]
    team = tflow.load(load_recipe("recipes/tiny.yaml", overrides))
    perturb(team.receiver.generator, seed=1)
    weights_part.save(team.receiver.generator, tmp / "ckpt")
    return overrides, tmp / "ckpt"


def recipe_args(tmp) -> list[str]:
    """The tiny recipe with its model in `tmp/model` (built there on first use) and short decoding."""
    return ["recipes/tiny.yaml", f"model.path={tmp}/model", f"train.out_dir={tmp}/train", "generate.max_new_tokens=4",
            "generate.message_tokens=4", "data.relay.n_train=16", "data.relay.n_test=8"]
