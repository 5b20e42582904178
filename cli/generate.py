"""``driftmerge generate``: sample with output-space (logit) extrapolation between an early and a late model."""

from __future__ import annotations

import json
import sys

import click
from driftmerge_cli.common import pop_sampling, sampling_options


@click.command("generate")
@click.option("--early", required=True, help="Model A (a folder or Hub id): the earlier point, alpha 0.")
@click.option("--late", required=True, help="Model B: the later point, alpha 1 (a checkpoint or an apply output).")
@click.option("--alpha", type=float, default=1.5, show_default=True, help="z = z_A + alpha (z_B - z_A).")
@click.option("--prompts", required=True, type=click.Path(path_type=str), help='JSON lines: {"prompt": ...}.')
@sampling_options
@click.option("--reward", metavar="NAME|MODULE:FUNCTION", help="Also score the completions (needs answers).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("-o", "--output", "out", type=click.Path(path_type=str), help="JSON-lines file [default: stdout].")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
def generate_cmd(
    early: str,
    late: str,
    alpha: float,
    prompts: str,
    reward: str | None,
    device: str,
    out: str | None,
    overwrite: bool,
    **sampling: object,
) -> None:
    """Generate from two models in lockstep with logits z = z_A + alpha (z_B - z_A): alpha > 1 extrapolates
    beyond B. Writes one JSON line per completion: prompt index, sample, completion (and reward)."""
    from driftmerge.commands.generate import extrapolated_completions

    rows, summary = extrapolated_completions(
        early,
        late,
        alpha=alpha,
        prompts=prompts,
        sampling=pop_sampling(sampling),
        reward=reward,
        device=device,
        out=out,
        overwrite=overwrite,
    )
    if out is None:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        click.echo(f"wrote {len(rows)} completions to {out}", err=True)
    if summary:
        click.echo(summary, err=True)
