"""A sixth channel defined in this file alone runs through communicate, train, eval, checkpoints, ablations and serve."""

import json
from pathlib import Path

import pytest
import torch
from helpers import client, serving
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

import tflow
from tflow.agents.encoding import prompt_length
from tflow.agents.generation import generate
from tflow.channels import registry
from tflow.channels.ledger import Stages, generated_usage
from tflow.channels.registry import Ablations, Channel, TrainedPart
from tflow.cli import app
from tflow.config.base import Section
from tflow.config.recipe import load_recipe
from tflow.errors import ChannelError, QueryError
from tflow.evaluation.ablations import derangement
from tflow.lora.delta import LoRADelta
from tflow.lora.patching import patched
from tflow.reply import Reply, Usage
from tflow.serving.app import served_channels
from tflow.training.checkpoint import read_part, state_tensors, write_part
from tflow.training.data import teacher_forced
from tflow.training.modules import ExampleModule

TOY_FILE = "toy.safetensors"


class ToyOptions(Section):
    """How strongly the toy channel's learned delta is applied."""

    strength: float = Field(1.0, ge=0)
    """Multiplier on the learned delta."""


class ToySection(ToyOptions):
    """The toy channel: one learned LoRA on every q_proj of the receiver, scaled per query."""

    rank: int = Field(2, gt=0)
    """Rank of the learned LoRA."""


class ToyPart(nn.Module):
    """A learned rank-r LoRA on each q_proj: the toy channel's message is a per-query scale of it."""

    def __init__(self, model, rank: int):
        super().__init__()
        self.names = [n for n, m in model.named_modules() if n.endswith("q_proj")]
        shapes = [dict(model.named_modules())[n].weight.shape for n in self.names]
        g = torch.Generator().manual_seed(0)
        self.a = nn.ParameterList([nn.Parameter(torch.randn(rank, i, generator=g) * 0.1) for _, i in shapes])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(o, rank)) for o, _ in shapes])
        self.rank = rank

    def delta(self, scales: torch.Tensor) -> LoRADelta:
        """One row per query, query q's row scaled by scales[q]."""
        n = len(scales)
        s = scales.to(self.a[0].dtype)[:, None, None]
        return LoRADelta({name: (a.expand(n, -1, -1), b * s) for name, a, b in zip(self.names, self.a, self.b,
                                                                                   strict=True)}, scale=1.0)


def run(call):
    receiver = call.receiver
    stages = Stages(call.senders, receiver)
    part = receiver.parts["toy"]
    scales = call.message if call.message is not None else torch.ones(len(call.queries))
    with stages("receiver"), patched(receiver.model, part.delta(scales * call.options["strength"])):
        out = generate(receiver.model, receiver.tokenizer, [receiver.prompt(q) for q in call.queries], call.settings,
                       **call.decode)
    return [Reply(text, "toy", Usage({receiver.name: generated_usage(receiver, out, q)}), **stages.measured,
                  finish_reason=out.finish_reasons[q]) for q, text in enumerate(out.texts)]


def check(call):
    if "toy" not in call.receiver.parts:
        raise ChannelError("the toy channel needs its part on the receiver")
    if call.message is not None and len(call.message) != len(call.queries):
        raise QueryError("the toy message needs one scale per query")


def context_use(team, query, contexts, max_tokens, options):
    receiver = team.receiver
    return [(receiver, prompt_length(receiver, receiver.prompt(query)), max_tokens)]


class ToyModule(ExampleModule):
    def __init__(self, team, splits):
        super().__init__(team, splits)
        self.part = team.receiver.parts["toy"]

    def save_part(self, out_dir):
        return save(self.part, out_dir, self.team)

    def loss(self, examples):
        queries, _, targets = self.batch_parts(examples)
        receiver = self.team.receiver
        ids, mask, labels = teacher_forced(receiver.tokenizer, [receiver.prompt(q) for q in queries], targets,
                                           self.team.recipe.train.max_length, self.device)
        with patched(receiver.model, self.part.delta(torch.ones(len(queries))), validate=False):
            return receiver.model(input_ids=ids, attention_mask=mask, labels=labels).loss


def build(recipe, senders, receiver):
    return ToyPart(receiver.model, recipe.toy.rank)


def save(part, out_dir, team):
    return write_part(out_dir, TOY_FILE, "toy", state_tensors(part), {"rank": part.rank}, {"names": part.names},
                      team.recipe)


def load(part, path, team):
    part.load_state_dict(read_part(path, "toy", {"names": part.names}, {"rank": part.rank}))


def ablate(messages, names):
    rows = {}
    for name in names:
        if name == "shuffled":
            rows[name] = messages[torch.tensor(derangement(len(messages)))]
        elif name == "static":
            rows[name] = messages.mean().expand(len(messages)).clone()
    return rows


TOY = Channel(
    "toy", run, context_use, check=check, options=ToyOptions,
    settings=lambda recipe: {"strength": recipe.toy.strength}, sections={"toy": ToySection},
    part=TrainedPart(TOY_FILE, "toy", "toy LoRA", build, save, load, module=lambda: ToyModule),
    message_keyword="message",
    ablations=Ablations(("shuffled", "static"), lambda s, r, queries, *args, **kw: torch.linspace(0.5, 1.5, len(queries)),
                        ablate, lambda messages, rows: messages[rows]),
)


@pytest.fixture(scope="module")
def toy():
    """The toy channel registered for this module's tests, and removed after them."""
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


def args(tmp: Path, *extra: str) -> list[str]:
    return ["recipes/tiny.yaml", f"model.path={tmp}/model", f"train.out_dir={tmp}/out", "generate.max_new_tokens=4",
            "data.relay.n_train=32", "data.relay.n_test=6", "data.limit=32", *extra]


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """`tflow train train.channel=toy` from the CLI, in this process: the run's folder."""
    tmp = tmp_path_factory.mktemp("toy")
    result = CliRunner().invoke(app, ["train", *args(tmp, "train.channel=toy", "train.max_steps=4", "train.val_every=2",
                                                     "train.lr=0.05"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "training the toy LoRA for 4 steps" in result.output
    return tmp


def test_a_registered_channel_owns_its_recipe_section_options_and_part(toy, tmp_path):
    recipe = load_recipe(args(tmp_path)[0], args(tmp_path)[1:] + ["toy.strength=0.5", "train.channel=toy"])
    assert recipe.toy.strength == 0.5 and recipe.toy.rank == 2
    assert "toy:" in recipe.to_yaml()
    team = tflow.load(recipe)
    assert isinstance(team.receiver.parts["toy"], ToyPart)
    with pytest.raises(QueryError, match="strength must be a number >= 0, got -1.0"):
        team.communicate("Hi", channel="toy", strength=-1.0)
    with pytest.raises(QueryError, match="the toy channel takes no option 'rounds'; its options: strength"):
        team.communicate("Hi", channel="toy", rounds=2)
    with pytest.raises(tflow.errors.RecipeError, match=r"toy.rank: must be > 0, got 0"):
        load_recipe(args(tmp_path)[0], args(tmp_path)[1:] + ["toy.rank=0"])


def test_communicate_runs_it_with_the_fresh_part_as_an_exact_no_op(toy, tmp_path):
    team = tflow.load(load_recipe(args(tmp_path)[0], args(tmp_path)[1:]))
    query = "What is the secret code of Lisbon?"
    toy_reply = team.communicate(query, channel="toy")
    assert toy_reply.channel == "toy" and toy_reply.text == team.communicate(query, channel="none").text
    assert team.label("toy") == "toy"


def test_trained_part_round_trips_through_its_checkpoint(toy, trained):
    out = trained / "out"
    assert (out / TOY_FILE).is_file() and (out / "toy-run" / "metrics.csv").is_file()
    losses = [float(r.split(",")[-1]) for r in (out / "toy-run" / "metrics.csv").read_text().splitlines()[1:]
              if r.split(",")[-1]]
    assert losses, "no val_loss logged"
    team = tflow.load(load_recipe(args(trained)[0], args(trained)[1:]), checkpoint=out)
    assert team.trained == {"toy"}
    saved = read_part(out / TOY_FILE, "toy", {"names": team.receiver.parts["toy"].names}, {"rank": 2})
    for key, value in state_tensors(team.receiver.parts["toy"]).items():
        assert torch.equal(value, saved[key]), key
    assert any(b.abs().sum() > 0 for b in team.receiver.parts["toy"].b), "training left B at zero"


def test_eval_runs_it_with_its_ablations_and_labels(toy, trained, tmp_path):
    result = CliRunner().invoke(app, ["eval", *args(trained), "--checkpoint", str(trained / "out"),
                                      "--channels", "none,toy", "--ablations", "shuffled,static", "--limit", "4",
                                      "--out", str(tmp_path / "eval"), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["channels"]) == {"none", "toy"}
    assert set(report["ablations"]["toy"]) == {"shuffled", "static"}
    assert report["n"] == 4 and report["channels"]["toy"]["label"] == "toy"


def test_eval_refuses_it_without_its_trained_part(toy, tmp_path):
    result = CliRunner().invoke(app, ["eval", *args(tmp_path), "--channels", "toy", "--no-progress"])
    assert result.exit_code == 2
    assert "the toy channel needs a checkpoint with its toy LoRA: pass --checkpoint DIR" in result.output


def test_serve_answers_as_model_tflow_toy_as_offline(toy, trained):
    team = tflow.load(load_recipe(args(trained)[0], args(trained)[1:]), checkpoint=trained / "out")
    query = "What is the secret code of Lisbon?"
    with serving(team, served_channels(team)) as (url, _):
        assert "tflow-toy" in {m.id for m in client(url).models.list()}
        answer = client(url).chat.completions.create(model="tflow-toy", max_tokens=4,
                                                     messages=[{"role": "user", "content": query}])
    assert answer.choices[0].message.content == team.communicate(query, channel="toy", max_new_tokens=4).text


def test_registering_a_channel_twice_or_a_taken_section_fails_at_once(toy):
    with pytest.raises(ValueError, match="channel 'toy' is already registered"):
        registry.register(TOY)
    with pytest.raises(ValueError, match="recipe section 'kv' already belongs to the kv channel"):
        registry.register(Channel("other", run, context_use, sections={"kv": ToySection}))
    with pytest.raises(ValueError, match="channel record 'broken' is missing run"):
        Channel("broken", None, context_use)
