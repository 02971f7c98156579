"""`tflow demo`, `tflow bench`, `tflow serve` and `tflow export`: the programs built on a team."""

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
    overrides_of,
    parse_contexts,
)


@command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the model, the generator and the report.")] = Path("runs/demo"),
    pretrain_steps: Annotated[int, typer.Option(min=1, help="Backbone pretraining steps.")] = 800,
    train_steps: Annotated[int | None, typer.Option(
        min=1, help="Training steps of each channel's part \\[default: the recipe's].")] = None,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Held-out facts to evaluate \\[default: all].")] = None,
    seed: Annotated[int, typer.Option(
        min=0, help="Seed of the backbone, its pretraining and the generator; the held-out facts stay the same.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    overrides: OverridesArg = None,
    set_overrides: SetOption = None,
) -> None:
    """The embedded default: weight-space communication shown end to end, offline, on CPU.

    Builds a tiny model, pretrains it on the relay format, trains a generator, a kv LoRA and latent
    links, and compares the none, text, weights, kv and latent channels on held-out facts (report
    files as `tflow eval` writes them). Overrides apply to recipes/demo.yaml, for example
    `generator.kind=basis generator.rank=16`.
    """
    import torch

    from tflow.demo import DemoSettings, run_demo

    torch.set_num_threads(threads)
    settings = DemoSettings(pretrain_steps=pretrain_steps, train_steps=train_steps, eval_limit=eval_limit,
                            seed=seed, overrides=tuple(overrides_of(overrides, set_overrides)))
    run_demo(out, settings, progress=progress, say=typer.echo)
    typer.echo(f"report: {out / 'report.md'} (and report.json, report.png, predictions.jsonl)")


@command()
def bench(
    shape: Annotated[str, typer.Option(help="Model shape: tiny, medium (hidden 1024, 8 layers) or qwen3-4b (GPU).")]
    = "medium",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer variants and repeats (under 3 minutes on CPU).")]
    = False,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Run a GPU-sized shape on CPU anyway.")] = False,
    device: Annotated[str | None, typer.Option(
        help="Device to measure a --shape on: cpu, cuda or cuda:N \\[default: the first GPU, else the CPU].")] = None,
    message_tokens: Annotated[int | None, typer.Option(
        min=1, help="Tokens per text-channel message \\[default: 256, 128 with --quick].")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch \\[default: torch's choice].")] = None,
    recipe: Annotated[Path | None, typer.Option(
        help="Measure the receiver backbone of this recipe (a real model) instead of a random --shape.")] = None,
) -> None:
    """Measure patched vs plain decode, sender encoding, the generator and each channel, in one run.

    Prints a table of the measurements side by side and the headline ratios.
    """
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
    if device is not None:
        from tflow.backbones.devices import resolve

        device = str(resolve(device, "--device"))
    result = run_bench(shape, quick, device=device, force=force, message_tokens=message_tokens, recipe=loaded)
    Console().print(table(result))
    typer.echo(f"patch_overhead {result['patch_overhead']:.3f} · weights_vs_none {result['weights_vs_none']:.3f}"
               f" · text_vs_weights {result['text_vs_weights']:.2f} · patch_overhead_basis "
               f"{result['patch_overhead_basis']:.3f} · weights_vs_none_basis {result['weights_vs_none_basis']:.3f}")
    if json_file is not None:
        atomic_write_text(json_file, json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_file}")


@command()
def serve(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
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
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch \\[default: torch's choice].")] = None,
    set_overrides: SetOption = None,
) -> None:
    """Serve the team over an OpenAI-compatible API, one model id per channel.

    The model ids are tflow-text, tflow-none, tflow-kv where the senders share the receiver's
    backbone, and tflow-weights and tflow-latent for the parts the checkpoint holds. Concurrent
    requests are batched, with a delta per row. Ctrl-C finishes the requests in flight, then exits.
    """
    from tflow.config.recipe import load_recipe
    from tflow.serving.app import ServeSettings
    from tflow.serving.server import bind

    settings = ServeSettings(host, port, max_batch, max_wait_ms, max_queue, api_key, max_body_bytes)
    loaded = load_recipe(recipe, overrides_of(overrides, set_overrides))
    sock = bind(host, port)  # a taken port fails now, not after loading the models
    try:
        import torch

        import tflow
        from tflow.serving.app import create_app, served_channels
        from tflow.serving.server import listen, run

        if threads is not None:
            torch.set_num_threads(threads)
        team = tflow.load(loaded, checkpoint)
        channels = served_channels(team)
        app = create_app(team, channels, settings)
    except BaseException:
        sock.close()
        raise
    address = listen(sock)
    typer.echo(f"serving {', '.join('tflow-' + c for c in channels)} on {address}/v1 (Ctrl-C to stop)", err=True)
    run(app, sock)
    typer.echo("stopped", err=True)


@command()
def export(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Option(help="Trained generator folder (a train.out_dir).", show_default=False)],
    query: Annotated[str, typer.Option(help="The query whose fused delta is exported.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for adapter_config.json and adapter_model.safetensors.",
                                      show_default=False)],
    overrides: OverridesArg = None,
    context: ContextOption = None,
    set_overrides: SetOption = None,
) -> None:
    """Write one query's fused delta as a PEFT LoRA adapter (peft and vLLM load it)."""
    from tflow.config.recipe import load_recipe
    from tflow.errors import QueryError
    from tflow.io import writable_dir
    from tflow.training.checkpoint import require_parts

    # Every mistake below is found before any weights load.
    if not query.strip():
        raise QueryError("--query must not be empty")
    require_parts(["weights"], checkpoint)
    contexts = parse_contexts(context)
    loaded = load_recipe(recipe, overrides_of(overrides, set_overrides))
    check_senders(contexts, loaded)
    writable_dir(out)
    import tflow
    from tflow.channels.weights.export import export_adapter
    from tflow.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, tied_to_embeddings

    team = tflow.load(loaded, checkpoint)
    config = export_adapter(team, query, out, contexts)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        typer.echo(f"wrote {out / name}")
    for name in tied_to_embeddings(team.receiver.model, config["target_modules"]):
        typer.echo(f"note: {name} shares its weight with the input embeddings; load the adapter unmerged "
                   "(merging it would change the embeddings too)", err=True)
