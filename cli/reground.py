"""``driftmerge reground --run-dir DIR --every M --jump N``: periodic re-grounding for shell-driven training."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from driftmerge_cli.common import RankType

if TYPE_CHECKING:
    from driftmerge.core.trajectory import Fit


@click.command("reground")
@click.option("--run-dir", required=True, metavar="DIR", help="The run folder the trainer saves checkpoints into.")
@click.option("--every", required=True, type=int, metavar="M", help="Window length in training steps.")
@click.option("--jump", required=True, type=int, metavar="N", help="Steps to jump ahead after each window.")
@click.option("--base", metavar="PATH", help="The model the run started from [default: start at its first checkpoint].")
@click.option("--base-step", type=int, default=0, show_default=True, help="Step of --base.")
@click.option("-o", "--output", "out", metavar="DIR", help="Where the jumps go [default: DIR/driftmerge-reground].")
@click.option("--rank", type=RankType(), default="1", show_default=True, help="Rank K, or an energy share like 0.9.")
@click.option(
    "--fit",
    type=click.Choice(["lsq", "pca", "endpoint"]),
    default="lsq",
    show_default=True,
    help="How each window's line is fitted, as extract --fit.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["keep", "reset"]),
    default="keep",
    show_default=True,
    help="Adam's moments in the written checkpoint: keep the window end's, or reset them (Adam starts afresh; "
    "learning rate and schedule kept).",
)
@click.option("--once", is_flag=True, help="Process the complete windows and exit (default: keep watching).")
@click.option("--poll", type=float, default=60.0, show_default=True, help="Seconds between looks at the folder.")
def reground_cmd(
    run_dir: str,
    every: int,
    jump: int,
    base: str | None,
    base_step: int,
    out: str | None,
    rank: int | float,
    fit: Fit,
    optimizer: str,
    once: bool,
    poll: float,
) -> None:
    """Whenever M more steps of the run are saved, fit their drift and write the model N steps ahead as
    OUT/checkpoint-<S>, a checkpoint a transformers/TRL Trainer resumes from (resume_from_checkpoint): the model, its
    trainer_state.json at global step S, and the window end's optimizer (--optimizer), scheduler (moved on N steps)
    and RNG states."""
    from driftmerge.commands.reground_run import reground_run_dir

    done = reground_run_dir(
        run_dir,
        every=every,
        jump=jump,
        base=base,
        base_step=base_step,
        out=out,
        rank=rank,
        fit=fit,
        optimizer=optimizer,
        once=once,
        poll=poll,
        log=lambda s: click.echo(s, err=True),
    )
    for w in done:
        click.echo(f"wrote {w.folder}: window {w.start}..{w.end} extrapolated {jump} steps ahead")
    if not done:
        click.echo("no complete window yet; nothing written")
