"""The `tflow` command line: parse arguments, call the library, print.

Every command is wrapped in `reports_errors`, so a user mistake (any `TflowError`) ends as
`error: ...` on stderr and exit code 2, never a traceback. Commands import what they need
(torch, transformers, lightning) inside their body so `tflow --help` stays instant.
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tflow import __version__
from tflow.errors import RecipeError, TflowError

app = typer.Typer(
    name="tflow",
    help="Weight-space communication for teams of LLM agents.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # a bug's traceback must not dump tensors and weights
)

USAGE_ERROR = 2
Command = TypeVar("Command", bound=Callable)


def error_message(err: TflowError) -> str:
    """The text the CLI prints for a user mistake: one line, or a header and one line per problem."""
    if isinstance(err, RecipeError) and len(err.problems) > 1:
        lines = [f"error: {err.source or 'recipe'}: {len(err.problems)} problems"]
        return "\n".join(lines + [f"  {problem}" for problem in err.problems])
    return f"error: {err}"


def reports_errors(command: Command) -> Command:
    """Decorate a command so a `TflowError` prints `error_message` to stderr and exits with 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TflowError as err:
            typer.echo(error_message(err), err=True)
            raise typer.Exit(USAGE_ERROR) from None

    return run


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True,
                     help="Show the version and exit."),
    ] = False,
) -> None:
    """Weight-space communication for teams of LLM agents: senders talk to a receiver through
    per-query LoRA deltas."""


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key.path=value, e.g. train.max_steps=40 senders.0.role=...",
                   show_default=False),
]


@app.command()
@reports_errors
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe as YAML.")] = False,
) -> None:
    """Check a recipe and its overrides against the schema, without loading any weights.

    Every problem is listed at once, as key.path: message.
    """
    from tflow.config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or ())
    if show:
        typer.echo(loaded.to_yaml(), nl=False)
    n = len(loaded.senders)
    typer.echo(
        f"ok: {recipe} ({n} sender{'s' * (n != 1)}, "
        f"generator {loaded.generator.kind} rank {loaded.generator.rank})"
    )


@app.command()
@reports_errors
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from train.out_dir/lightning/last.ckpt.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train one channel's part on Lightning (the backbones stay frozen): the parameter generator
    (train.channel=weights, the default), the kv LoRA (kv) or the latent links (latent).

    Writes train.out_dir/generator.safetensors (weights), kv/ (a peft adapter folder) or
    latent.safetensors, with recipe.yaml, metrics.csv and a resumable Lightning checkpoint.
    """
    from tflow.channels import registry
    from tflow.config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or ())
    trained = registry.get(loaded.train.channel).part
    part = trained.describe(loaded) if trained.describe is not None else trained.noun
    typer.echo(f"training the {part} for {loaded.train.max_steps} steps -> {loaded.train.out_dir}")
    from tflow.training.loop import train as run

    result = run(loaded, resume=resume, progress=progress)
    if result.interrupted:
        again = " ".join(["tflow train", str(recipe), *(overrides or ()), "--resume"])
        typer.echo(f"interrupted at step {result.global_step}; continue with: {again}", err=True)
        raise typer.Exit(130)
    typer.echo(f"done: {result.global_step} steps; {part} in {result.part}")


def _contexts(items: list[str] | None) -> dict[str, str]:
    """--context NAME=TEXT options as {sender name: document}.

    Raises:
        QueryError: an item without `=` or without a name.
    """
    from tflow.errors import QueryError

    contexts = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise QueryError(f"--context needs NAME=TEXT, got {item!r}")
        contexts[name] = text
    return contexts


def _check_senders(contexts: dict[str, str], team) -> None:
    from tflow.errors import QueryError

    unknown = sorted(set(contexts) - {s.name for s in team.senders})
    if unknown:
        raise QueryError(f"--context names unknown sender(s) {unknown}; senders: {[s.name for s in team.senders]}")


ContextOption = Annotated[list[str] | None, typer.Option(
    "--context", help="A sender's private document for this question, as NAME=TEXT (repeatable).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Recipe override key.path=value (repeatable).")]


@app.command()
@reports_errors
def ask(
    recipe: RecipeArg,
    question: Annotated[str, typer.Argument(help="The question for the receiver.", show_default=False)],
    checkpoint: Annotated[Path | None, typer.Option(help="Trained generator folder (a train.out_dir).")] = None,
    channel: Annotated[str, typer.Option(help="none, text, weights, kv or latent.")] = "weights",
    context: ContextOption = None,
    overrides: SetOption = None,
) -> None:
    """Ask one question and print the receiver's answer and one usage line."""
    from tflow.training.checkpoint import require_parts

    require_parts([channel], checkpoint)
    contexts = _contexts(context)
    import tflow

    team = tflow.load(recipe, checkpoint, overrides or ())
    _check_senders(contexts, team)
    reply = team.communicate(question, channel=channel, contexts=[contexts] if contexts else None)
    typer.echo(reply.text)
    for warning in reply.warnings:
        typer.echo(f"warning: {warning}", err=True)
    u = reply.usage
    stages = " ".join(f"{k} {v:.3f}s" for k, v in reply.timings.items())
    typer.echo(f"[{team.label(channel)}] tokens {u.total_tokens} (prompt {u.prompt_tokens} of which cached "
               f"{u.cached_tokens}, generated {u.generated_tokens}; processed {u.processed_tokens}) · {stages}", err=True)


@app.command("eval")
@reports_errors
def eval_(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Trained folder (a train.out_dir) with the parts of weights, kv or latent; weights and latent "
             "need one, kv runs untrained (LatentMAS) without.")] = None,
    channels: Annotated[str, typer.Option(
        help="Comma-separated channels to compare: none, text, weights, kv, latent.")] = "none,text,weights",
    task: Annotated[str | None, typer.Option(help="Task to evaluate [default: the recipe's data.task].")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N examples.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, report.png, predictions.jsonl.")]
    = Path("runs/eval"),
    split: Annotated[str, typer.Option(help="Dataset split (relay always uses its held-out test split).")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per batched call.")] = 8,
    ablations: Annotated[str | None, typer.Option(
        help="Comma-separated ablations: shuffled, static, drop-sender (weights, kv, latent), scale (weights).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    strategy: Annotated[str | None, typer.Option(
        help="Shard the queries over processes on Lightning with this strategy: ddp (or auto) "
             "[default: one process; ddp when --devices or --num-nodes asks for more].")] = None,
    devices: Annotated[str | None, typer.Option(
        help="Processes per node when sharding: a count or auto (on cpu, at most one per core).")] = None,
    num_nodes: Annotated[int, typer.Option(help="Machines to shard the queries over.")] = 1,
) -> None:
    """Compare channels on a task under one cost ledger and write a report to --out.

    Prints the table: accuracy, processed tokens and time of each channel, with ratios against text
    and none, and, with --ablations, the accuracy of each ablation row. The weights channel's delta
    diagnostics go into the report. With --strategy ddp --devices N [--num-nodes M] the queries are
    sharded over processes (the recipe's train.accelerator); rank 0 writes the one report.
    """
    from tflow.errors import DataError
    from tflow.evaluation.evaluate import parse_channels

    names = parse_channels(channels)
    from tflow import tasks
    from tflow.config.recipe import load_recipe
    from tflow.io import writable_dir

    loaded = load_recipe(recipe, overrides or ())
    name = task or (loaded.data.task if loaded.data else None)
    if name is None:
        raise DataError("no task to evaluate: pass --task NAME or set data.task in the recipe")
    chosen = tasks.get(name)
    from tflow.evaluation.ablations import parse_ablations

    parse_ablations(ablations, names, [s.name for s in loaded.senders])
    from tflow.training.checkpoint import require_parts

    require_parts(names, checkpoint)  # before any weights load
    out = writable_dir(out)
    trainer = None
    if strategy is not None or devices is not None or num_nodes != 1:
        from tflow.evaluation.sharded import device_override, eval_trainer

        trainer = eval_trainer(strategy or "ddp", devices or 1, num_nodes, loaded.train.accelerator, progress)
        loaded = load_recipe(recipe, [*(overrides or ()), device_override(trainer)])
    import tflow
    from tflow.evaluation.evaluate import evaluate
    from tflow.evaluation.report import REPORT_FILES, render_table, write_report
    from tflow.training.data import eval_examples

    examples = eval_examples(loaded, chosen, split, limit)
    team = tflow.load(loaded, checkpoint)
    if trainer is None:
        typer.echo(f"evaluating {', '.join(names)} on {len(examples)} {name} examples -> {out}")
        result = evaluate(team, chosen, examples, names, batch_size=batch_size, progress=progress, ablations=ablations)
    else:
        from tflow.evaluation.sharded import evaluate_sharded

        if trainer.is_global_zero:
            typer.echo(f"evaluating {', '.join(names)} on {len(examples)} {name} examples over "
                       f"{trainer.world_size} processes -> {out}")
        result = evaluate_sharded(trainer, team, chosen, examples, names, batch_size=batch_size, ablations=ablations)
        if result is None:
            return  # another process's shard: global rank 0 writes the report
    typer.echo(render_table(write_report(result, out)))
    for file in REPORT_FILES:
        typer.echo(f"wrote {out / file}")
    for channel in result.channels.values():
        for f in channel.failures:
            typer.echo(f"warning: {channel.label or channel.channel} query {f.index} failed on rank {f.rank}: "
                       f"{f.message}", err=True)


@app.command()
@reports_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the model, the generator and the report.")] = Path("runs/demo"),
    pretrain_steps: Annotated[int, typer.Option(min=1, help="Backbone pretraining steps.")] = 800,
    train_steps: Annotated[int | None, typer.Option(
        min=1, help="Training steps of each channel's part [default: the recipe's].")] = None,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Held-out facts to evaluate [default: all].")] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the backbone, its pretraining and the generator; the held-out facts stay the same.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    overrides: OverridesArg = None,
) -> None:
    """The embedded default: weight-space communication shown end to end, offline, on CPU.

    Builds a tiny model, pretrains it on the relay format, trains a generator, a kv LoRA and latent
    links, and compares the none, text, weights, kv and latent channels on held-out facts (report
    files as `tflow eval` writes them). KEY=VALUE overrides apply to recipes/demo.yaml, for example
    `generator.kind=basis generator.rank=16`.
    """
    import torch

    from tflow.demo import DemoSettings, run_demo

    torch.set_num_threads(threads)
    settings = DemoSettings(pretrain_steps=pretrain_steps, train_steps=train_steps, eval_limit=eval_limit,
                            seed=seed, overrides=tuple(overrides or ()))
    run_demo(out, settings, progress=progress, say=typer.echo)
    typer.echo(f"report: {out / 'report.md'} (and report.json, report.png, predictions.jsonl)")


@app.command()
@reports_errors
def bench(
    shape: Annotated[str, typer.Option(help="Model shape: tiny, medium (hidden 1024, 8 layers) or qwen3-4b (GPU).")]
    = "medium",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer variants and repeats (under 3 minutes on CPU).")]
    = False,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Run a GPU-sized shape on CPU anyway.")] = False,
    message_tokens: Annotated[int | None, typer.Option(
        min=1, help="Tokens per text-channel message (default 256, 128 with --quick).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
    recipe: Annotated[Path | None, typer.Option(
        help="Measure the receiver backbone of this recipe (a real model) instead of a random --shape.")] = None,
) -> None:
    """Measure side by side in one run: patched vs plain decode, batched sender encoding, the
    generator, and end to end per channel; prints a table and the headline ratios."""
    import json

    import torch
    from rich.console import Console

    from tflow.evaluation.bench import run_bench, table
    from tflow.io import atomic_write_text, writable_file

    if json_file is not None:
        writable_file(json_file)  # fail now, not after minutes of measuring
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = None
    if recipe is not None:
        from tflow.config.recipe import load_recipe

        loaded = load_recipe(recipe)
    result = run_bench(shape, quick, force=force, message_tokens=message_tokens, recipe=loaded)
    Console().print(table(result))
    typer.echo(f"patch_overhead {result['patch_overhead']:.3f} · weights_vs_none {result['weights_vs_none']:.3f}"
               f" · text_vs_weights {result['text_vs_weights']:.2f} · patch_overhead_basis "
               f"{result['patch_overhead_basis']:.3f} · weights_vs_none_basis {result['weights_vs_none_basis']:.3f}")
    if json_file is not None:
        atomic_write_text(json_file, json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_file}")


@app.command()
@reports_errors
def serve(
    recipe: RecipeArg,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Trained folder (a train.out_dir): tflow-weights and tflow-latent for the parts it holds, and "
             "its kv LoRA; without one tflow-kv runs as LatentMAS, beside tflow-text and tflow-none.")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most rows (choices) in one batch.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long the oldest waiting request waits for batch-mates.")]
    = 10.0,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; more are answered 503.")] = 256,
    api_key: Annotated[str | None, typer.Option(
        envvar="TFLOW_API_KEY", show_default=False,
        help="Require Authorization: Bearer KEY on every endpoint but /health.")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger ones are answered 413.")]
    = 1 << 20,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
    overrides: SetOption = None,
) -> None:
    """Serve the team over an OpenAI-compatible API: one model id per channel (tflow-text,
    tflow-none, tflow-kv where the senders share the receiver's backbone, and tflow-weights and
    tflow-latent for the parts the checkpoint holds), concurrent requests batched with a delta per
    row. Ctrl-C finishes the requests in flight, then exits."""
    from tflow.serving.app import ServeSettings
    from tflow.serving.server import bind

    settings = ServeSettings(host, port, max_batch, max_wait_ms, max_queue, api_key, max_body_bytes)
    sock = bind(host, port)  # a taken port fails now, not after loading the models
    try:
        import torch

        import tflow
        from tflow.serving.app import create_app, served_channels
        from tflow.serving.server import listen, run

        if threads is not None:
            torch.set_num_threads(threads)
        team = tflow.load(recipe, checkpoint, overrides or ())
        channels = served_channels(team)
        app = create_app(team, channels, settings)
    except BaseException:
        sock.close()
        raise
    address = listen(sock)
    typer.echo(f"serving {', '.join('tflow-' + c for c in channels)} on {address}/v1 (Ctrl-C to stop)", err=True)
    run(app, sock)
    typer.echo("stopped", err=True)


@app.command()
@reports_errors
def export(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Option(help="Trained generator folder (a train.out_dir).", show_default=False)],
    query: Annotated[str, typer.Option(help="The query whose fused delta is exported.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for adapter_config.json and adapter_model.safetensors.",
                                      show_default=False)],
    context: ContextOption = None,
    overrides: SetOption = None,
) -> None:
    """Write one query's fused delta as a PEFT LoRA adapter (peft and vLLM load it)."""
    from tflow.errors import QueryError
    from tflow.io import writable_dir

    if not query.strip():
        raise QueryError("--query must not be empty")
    from tflow.training.checkpoint import require_parts

    require_parts(["weights"], checkpoint)
    contexts = _contexts(context)
    writable_dir(out)  # fail before loading any weights
    import tflow
    from tflow.channels.weights.export import export_adapter
    from tflow.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, tied_to_embeddings

    team = tflow.load(recipe, checkpoint, overrides or ())
    _check_senders(contexts, team)
    config = export_adapter(team, query, out, contexts)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        typer.echo(f"wrote {out / name}")
    for name in tied_to_embeddings(team.receiver.model, config["target_modules"]):
        typer.echo(f"note: {name} shares its weight with the input embeddings; load the adapter unmerged "
                   "(merging it would change the embeddings too)", err=True)


if __name__ == "__main__":
    app()
