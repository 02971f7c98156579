"""`tflow validate` and `tflow train`: check a recipe, train one channel's part."""

from pathlib import Path
from typing import Annotated

import typer

from tflow.cli.common import (
    OverridesArg,
    RecipeArg,
    SetOption,
    command,
    overrides_of,
)


@command()
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe as YAML.")] = False,
    set_overrides: SetOption = None,
) -> None:
    """Check a recipe and its overrides against the schema, without loading any weights.

    Every problem is listed at once, as key.path: message.
    """
    from tflow.config.recipe import load_recipe

    loaded = load_recipe(recipe, overrides_of(overrides, set_overrides))
    if show:
        typer.echo(loaded.to_yaml(), nl=False)
    n = len(loaded.senders)
    typer.echo(
        f"ok: {recipe} ({n} sender{'s' * (n != 1)}, "
        f"generator {loaded.generator.kind} rank {loaded.generator.rank})"
    )


@command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from train.out_dir/lightning/last.ckpt.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    set_overrides: SetOption = None,
) -> None:
    """Train one channel's part on Lightning; the backbones stay frozen.

    The part is train.channel's: the parameter generator (weights, the default), the kv LoRA (kv)
    or the latent links (latent). It goes to train.out_dir as generator.safetensors, kv/ (a peft
    adapter folder) or latent.safetensors, with recipe.yaml, metrics.csv and a resumable Lightning
    checkpoint.
    """
    from tflow.channels import registry
    from tflow.config.recipe import load_recipe

    overrides = overrides_of(overrides, set_overrides)
    loaded = load_recipe(recipe, overrides)
    trained = registry.get(loaded.train.channel).part
    part = trained.describe(loaded) if trained.describe is not None else trained.noun
    typer.echo(f"training the {part} for {loaded.train.max_steps} steps -> {loaded.train.out_dir}")
    existing = Path(loaded.train.out_dir) / trained.file
    if existing.exists() and not resume:
        typer.echo(f"note: {existing} exists; this run overwrites it (--resume continues it instead)", err=True)
    from tflow.training.loop import train as run

    result = run(loaded, resume=resume, progress=progress)
    if result.interrupted:
        again = " ".join(["tflow train", str(recipe), *overrides, "--resume"])
        typer.echo(f"interrupted at step {result.global_step}; continue with: {again}", err=True)
        raise typer.Exit(130)
    typer.echo(f"done: {result.global_step} steps; {part} in {result.part}")
