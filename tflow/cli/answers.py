"""`tflow ask`, `tflow eval`, `tflow aggregate`, `tflow paired` and `tflow curves`: answer one question,
compare channels, pool seeds, pair channels of different evals, plot training runs."""

from pathlib import Path
from typing import Annotated

import typer

from tflow.cli.common import (
    ContextOption,
    OverridesArg,
    RecipeArg,
    SetOption,
    check_senders,
    command,
    note_random_backbone,
    overrides_of,
    parse_contexts,
)


@command()
def ask(
    recipe: RecipeArg,
    question: Annotated[str, typer.Argument(help="The question for the receiver.", show_default=False)],
    overrides: OverridesArg = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Trained folder (a train.out_dir) holding the channel's part.")] = None,
    channel: Annotated[str, typer.Option(help="none, text, weights, kv or latent.")] = "weights",
    context: ContextOption = None,
    set_overrides: SetOption = None,
) -> None:
    """Ask one question and print the receiver's answer and one usage line."""
    from tflow.config.recipe import load_recipe
    from tflow.errors import QueryError
    from tflow.training.checkpoint import require_parts

    # Every mistake below is found before any weights load.
    if not question.strip():
        raise QueryError("the question must not be empty")
    require_parts([channel], checkpoint)  # the channel exists, and the checkpoint holds its part
    contexts = parse_contexts(context)
    loaded = load_recipe(recipe, overrides_of(overrides, set_overrides))
    check_senders(contexts, loaded)
    import tflow

    team = tflow.load(loaded, checkpoint)
    reply = team.communicate(question, channel=channel, contexts=[contexts] if contexts else None)
    typer.echo(reply.text)
    for warning in reply.warnings:
        typer.echo(f"warning: {warning}", err=True)
    u = reply.usage
    stages = " ".join(f"{k} {v:.3f}s" for k, v in reply.timings.items())
    typer.echo(f"[{team.label(channel)}] tokens {u.total_tokens} (prompt {u.prompt_tokens} of which cached "
               f"{u.cached_tokens}, generated {u.generated_tokens}; processed {u.processed_tokens}) · {stages}", err=True)
    note_random_backbone(team)


@command("eval")
def eval_(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Trained folder (a train.out_dir) with the parts of weights, kv, latent or the none, text and "
             "context controls; weights and latent need one, kv runs untrained (LatentMAS) without.")] = None,
    channels: Annotated[str, typer.Option(
        help="Comma-separated channels to compare: none, text, context, weights, kv, latent, "
             "or any other registered channel.")] = "none,text,weights",
    task: Annotated[str | None, typer.Option(help="Task to evaluate \\[default: the recipe's data.task].")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N examples.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, report.png, predictions.jsonl.")]
    = Path("runs/eval"),
    split: Annotated[str, typer.Option(help="Dataset split (relay always uses its held-out test split).")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per batched call.")] = 8,
    ablations: Annotated[str | None, typer.Option(
        help="Comma-separated ablations: shuffled, static, drop-sender (weights, kv, latent); "
             "scale, copy-head, trunk (weights).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    strategy: Annotated[str | None, typer.Option(
        help="Shard the queries over processes on Lightning with this strategy: ddp (or auto) "
             "\\[default: one process; ddp when --devices or --num-nodes asks for more].")] = None,
    devices: Annotated[str | None, typer.Option(
        help="Processes per node when sharding: a count or auto (on cpu, at most one per core).")] = None,
    num_nodes: Annotated[int, typer.Option(help="Machines to shard the queries over.")] = 1,
    set_overrides: SetOption = None,
    on_training_split: Annotated[bool, typer.Option(
        "--on-training-split", help="Evaluate even on a split the checkpoint trained or validated on "
                                    "(refused otherwise); the report then says so.")] = False,
) -> None:
    """Compare channels on a task under one cost ledger and write a report to --out.

    Prints the table: accuracy, processed tokens and time of each channel, with ratios against text
    and none, and, with --ablations, the accuracy of each ablation row. The weights channel's delta
    diagnostics go into the report. With --strategy ddp --devices N [--num-nodes M] the queries are
    sharded over processes (the recipe's train.accelerator); rank 0 writes the one report.
    """
    from tflow.errors import DataError
    from tflow.evaluation.evaluate import parse_channels

    # Every mistake up to tflow.load is found before any weights load.
    names = parse_channels(channels)
    from tflow import tasks
    from tflow.config.recipe import load_recipe
    from tflow.io import writable_dir

    overrides = overrides_of(overrides, set_overrides)
    loaded = load_recipe(recipe, overrides)
    name = task or (loaded.data.task if loaded.data else None)
    if name is None:
        raise DataError("no task to evaluate: pass --task NAME or set data.task in the recipe")
    chosen = tasks.get(name)
    from tflow.evaluation.ablations import parse_ablations

    parse_ablations(ablations, names, [s.name for s in loaded.senders])
    from tflow.training.checkpoint import require_parts
    from tflow.training.data import check_eval_split

    trained_split = check_eval_split(checkpoint, name, split, on_training_split)
    require_parts(names, checkpoint)  # before any weights load
    out = writable_dir(out)
    trainer = None
    if strategy is not None or devices is not None or num_nodes != 1:
        from tflow.evaluation.sharded import device_override, eval_trainer

        trainer = eval_trainer(strategy or "ddp", devices or 1, num_nodes, loaded.train.accelerator, progress)
        loaded = load_recipe(recipe, [*overrides, device_override(trainer)])
    import tflow
    from tflow.evaluation.evaluate import evaluate
    from tflow.evaluation.report import REPORT_FILES, render_table, write_report
    from tflow.training.data import eval_examples

    examples = eval_examples(loaded, chosen, split)
    split_size, examples = len(examples), examples[:limit]  # the report records the split's size
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
    from tflow.evaluation.provenance import provenance

    origin = provenance(loaded, recipe, checkpoint, name, split, split_size, limit)
    origin["on_training_split"] = trained_split
    report = write_report(result, out, origin)
    typer.echo(render_table(report))
    for file in REPORT_FILES:
        typer.echo(f"wrote {out / file}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    for channel in result.channels.values():
        for f in channel.failures:
            typer.echo(f"warning: {channel.label or channel.channel} query {f.index} failed on rank {f.rank}: "
                       f"{f.message}", err=True)
    note_random_backbone(team)


@command()
def aggregate(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", show_default=False, help="Folders of tflow eval runs (each with its report.json).")],
    out: Annotated[Path, typer.Option(help="Folder for aggregate.json, aggregate.md, aggregate.png.")]
    = Path("runs/aggregate"),
) -> None:
    """Aggregate evals of one setup (say, several training seeds) into one table.

    Per channel: the mean accuracy, its range over the evals and a bootstrap interval that
    resamples the shared queries once for all evals, tokens per query, time, and time ratios
    taken within each eval. Evals that differ in task,
    split, queries, channels or recipe (its seed and train.out_dir aside) are refused.
    """
    from tflow.evaluation.aggregate import AGGREGATE_FILES, aggregate, render_table, write_aggregate

    summary = aggregate(runs)
    write_aggregate(summary, out)
    typer.echo(render_table(summary))
    for file in AGGREGATE_FILES:
        typer.echo(f"wrote {out / file}")


@command()
def paired(
    rows: Annotated[list[str], typer.Argument(
        metavar="RUN_DIR:CHANNEL", show_default=False,
        help="Channels of tflow eval runs (the --out folder, a colon, a channel or ablation row such as "
             "weights/shuffled); the first is compared with every other.")],
) -> None:
    """Paired differences between channels of different evals on the same queries.

    Each line is the first row's accuracy minus another's, with a paired bootstrap interval. Rows
    of another task, split or set of queries are refused, naming the difference.
    """
    from tflow.evaluation.paired import paired as pair
    from tflow.evaluation.paired import table

    typer.echo(table(pair(rows[0], rows[1:])))


@command()
def curves(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="Training runs: a metrics.csv or its folder (train.out_dir; <channel>-run for kv, latent, controls).")],
    metric: Annotated[str, typer.Option(help="The logged column to plot against step.")] = "val_accuracy",
    label: Annotated[list[str] | None, typer.Option(
        help="A legend label per run, in order (repeat the option); default: each run's folder name.")] = None,
    title: Annotated[str | None, typer.Option(help="The plot's title; default: the metric.")] = None,
    out: Annotated[Path, typer.Option(help="The png to write.")] = Path("runs/curves.png"),
) -> None:
    """Plot one metric of several training runs against step, and print first, last and best.

    val_accuracy is logged by runs trained with train.val_answers > 0; val_loss by every run.
    """
    from tflow.evaluation.curves import labels_for, read_curve, table, write_plot

    names = labels_for(runs, label)
    drawn = {name: read_curve(run, metric) for name, run in zip(names, runs, strict=True)}
    write_plot(drawn, metric, out, title)
    typer.echo(table(drawn, metric))
    typer.echo(f"wrote {out}")
