"""``driftmerge run RECIPE.yaml [--dry-run]``: run the extract / apply / push stages of a YAML recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from driftmerge_cli.common import command_line, progress_bar

if TYPE_CHECKING:  # the library (torch, pydantic) loads when the command runs, so --help stays instant
    from driftmerge.commands.recipes import Stage, StageResult


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=str))
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate the recipe, check that its inputs exist (or read as Hub ids) and print the equivalent commands; "
    "run nothing.",
)
def run_cmd(recipe: str, dry_run: bool) -> None:
    """Run the stages of RECIPE (a YAML file: extract, apply, push, in that order).

    Relative paths in the recipe are taken from the current folder, as on the command line.
    """
    from driftmerge.commands.recipes import check_inputs, load_recipe, plan, run_recipe

    job = load_recipe(recipe)
    if dry_run:
        check_inputs(job, recipe)
    lines = plan(job)
    click.echo(f"{recipe}: {len(lines)} stage{'s' * (len(lines) > 1)}, equivalent to:")
    for line in lines:
        click.echo(f"  {line}")
    if dry_run:
        click.echo("dry run: the recipe is valid and its inputs are there; nothing was run or written")
        return
    run_recipe(job, each=_run_stage)


def _run_stage(i: int, n: int, stage: Stage) -> StageResult:
    """One stage as the CLI runs it: a header, a progress bar, then what the stage wrote."""
    click.echo(f"\n[{i}/{n}] {stage.name}")
    with progress_bar(stage.name) as progress:
        done = stage.run(progress, command_line())
    print_stage(done)
    return done


def print_stage(done: StageResult) -> None:
    """What one stage wrote (extract: the same summary as ``driftmerge extract``), and what it pushed."""
    from driftmerge_cli.apply import print_apply
    from driftmerge_cli.extract import print_summary
    from driftmerge_cli.push import report_push

    if done.stage == "extract":
        print_summary(done.result, next_hint=False)
    elif done.stage == "apply":
        print_apply(done.result, done.what)
    else:
        report_push(done.result)
    if done.pushed is not None:
        report_push(done.pushed)
