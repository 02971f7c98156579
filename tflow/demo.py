"""tflow demo: a receiver answers about facts it never saw, passed on through its weights.

Offline, on CPU, in minutes: (1) build a tiny Qwen3-architecture model and tokenizer locally;
(2) teach it the relay format with a short pretraining, then freeze it; (3) train, on Lightning,
each channel's part so that a sender reading a private fact passes it to a receiver that sees
only the question: the generator (weights), the receiver's LoRA over the KV trace (kv) and the
latent links (latent), into one folder; (4) compare the five channels none, text, weights, kv
and latent on held-out facts and write the same report `tflow eval` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tflow.agents.agent import chat_prompt
from tflow.channels import CHANNELS, text_turn
from tflow.tasks import Example, relay

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
TRAINED = ("weights", "kv", "latent")  # the channels whose parts the demo trains, in this order


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults meet the demo's targets, small values make a quick check."""

    hidden_size: int = 96
    num_layers: int = 2
    vocab_size: int = 2048
    pretrain_steps: int = 800
    pretrain_lr: float = 1e-2  # at 5e-3, copying the fact from the context set in too late for some seeds
    train_steps: int | None = None  # None: the recipe's train.max_steps
    seed: int | None = None  # None: the recipe's seed (backbone init, pretraining, generator training)
    eval_limit: int | None = None  # None: the recipe's data.relay.n_test
    batch_size: int = 32
    overrides: tuple[str, ...] = ()  # KEY=VALUE for the recipe, e.g. ("generator.kind=basis",)


def message(example: Example) -> str:
    """The note a reader sender learns to write for the text channel (about 40 tokens).

    It restates what is asked, what the document says and the answer, as TextMAS agents'
    messages do. The text channel's cost grows with it: with a one-sentence note the weight
    channel would process about 0.7x the text channel's tokens instead of about 0.45x.
    """
    asked = example.question.removeprefix("What is the ").removesuffix("?")
    value = example.answer
    return (f"Message for the executor from the reader: the question asks for the {asked}. "
            f"I read my document, and it says that the {asked} is {value}. "
            f"So the answer to the question is {value}.")


def relay_pairs(examples: list[Example], tokenizer, task, sender_role: str, receiver_prompt: str):
    """(prompt, target) pairs teaching the relay format to one backbone in three roles.

    The receiver answers from a fact in its own context and from a reader's message; a reader
    writes its message. Every second example also trains the message, so the short answers
    keep their weight in the loss.
    """
    pairs = []
    for i, ex in enumerate(examples):
        query, fact, note, answer = task.prompt(ex), ex.contexts["reader"], message(ex), task.target(ex)
        pairs.append((chat_prompt(tokenizer, receiver_prompt, f"{fact}\n\n{query}"), answer))
        pairs.append((chat_prompt(tokenizer, receiver_prompt, text_turn(query, {"reader": note})), answer))
        if i % 2:
            pairs.append((chat_prompt(tokenizer, sender_role, f"{fact}\n\n{query}"), note))
    return pairs


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings = DemoSettings(), *,
             recipe_path: str | Path = DEMO_RECIPE, progress: bool = True,
             say: Callable[[str], None] = print) -> dict:
    """Build, pretrain, train and evaluate; writes the report files into `out` and returns the report.

    Raises:
        TflowError subclasses for a bad recipe or an unwritable `out`.
    """
    from rich.progress import Progress
    from transformers.utils import logging as hf_logging

    from tflow.backbones import tiny
    from tflow.backbones.pretrain import pretrain
    from tflow.config.recipe import load_recipe
    from tflow.evaluation.evaluate import evaluate
    from tflow.evaluation.report import render_table, write_report
    from tflow.io import writable_dir
    from tflow.team import load
    from tflow.training.data import eval_examples, load_splits
    from tflow.training.loop import train

    hf_logging.disable_progress_bar()
    out = writable_dir(Path(out))
    overrides = [*settings.overrides, f"train.out_dir={out / 'generator'}"]
    if settings.train_steps is not None:
        overrides.append(f"train.max_steps={settings.train_steps}")
    if settings.seed is not None:
        overrides.append(f"seed={settings.seed}")  # data.relay.seed stays: every seed sees the same facts
    recipe = load_recipe(recipe_path, overrides)  # model.path is checked once the model is built
    splits = load_splits(recipe)
    test = eval_examples(recipe, splits.task, "test", settings.eval_limit)  # never trained or validated on

    say(f"[1/4] building a tiny Qwen3-architecture model ({settings.num_layers} layers, hidden "
        f"{settings.hidden_size}) and a tokenizer, locally")
    # The tokenizer learns from the very conversations the model will read; the first one only
    # renders them (the chat template does not depend on the vocabulary).
    render = tiny.tokenizer(relay.corpus(), settings.vocab_size)
    pairs = relay_pairs(splits.train, render, splits.task, recipe.senders[0].role, recipe.receiver.system_prompt)
    tok = tiny.tokenizer(relay.corpus() * 2 + [p + t for p, t in pairs[:600]], settings.vocab_size)
    model = tiny.model(tok, seed=recipe.seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                       num_heads=4, num_kv_heads=2)

    say(f"[2/4] pretraining it on the relay format ({settings.pretrain_steps} steps), then freezing it")
    with Progress(disable=not progress) as bar:
        job = bar.add_task("pretraining", total=settings.pretrain_steps)
        pretrain(model, tok, pairs, steps=settings.pretrain_steps, batch_size=settings.batch_size,
                 lr=settings.pretrain_lr, seed=recipe.seed,
                 on_step=lambda step, loss: bar.update(job, advance=1, description=f"pretraining · loss {loss:.3f}"))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    del model
    recipe = load_recipe(recipe_path, [*overrides, f"model.path={out / 'model'}"])

    say(f"[3/4] training the {recipe.generator.kind} generator, the kv LoRA and the latent links on Lightning "
        f"({recipe.train.max_steps} steps each); the backbone stays frozen")
    for channel in TRAINED:
        train(load_recipe(recipe_path, [*overrides, f"model.path={out / 'model'}", f"train.channel={channel}"]),
              progress=progress)

    say(f"[4/4] comparing channels {', '.join(CHANNELS)} on {len(test)} held-out facts")
    team = load(recipe, checkpoint=out / "generator")
    result = evaluate(team, splits.task, test, list(CHANNELS), batch_size=settings.batch_size, progress=progress)
    report = write_report(result, out)
    say(render_table(report))
    return report

