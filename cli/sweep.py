"""``driftmerge sweep``: the reward of the model at each scale along the drift, on the user's own task."""

from __future__ import annotations

from pathlib import Path

import click
from driftmerge_cli.apply import print_apply
from driftmerge_cli.common import FloatListType, command_line, pop_sampling, progress_bar, sampling_options


@click.command("sweep")
@click.argument("adapter", default="driftmerge-adapter", type=click.Path(path_type=str))
@click.option("--base", help="Base model [default: the one recorded in the adapter].")
@click.option(
    "--allow-other-base",
    is_flag=True,
    help="Allow a --base whose weights differ from the recorded base's (as apply's flag; on a checkpoint of the "
    "run the drift would count twice).",
)
@click.option(
    "--scales",
    type=FloatListType(),
    default="0,0.5,1,1.25,1.5,2",
    show_default=True,
    help="Scales to score (alphas with --mode logits); 1 = the last checkpoint.",
)
@click.option(
    "--prompts",
    type=click.Path(path_type=str),
    help='JSON lines: {"prompt": ..., "answer": ...} (required unless --eval-cmd).',
)
@click.option(
    "--reward",
    metavar="NAME|MODULE:FUNCTION",
    help="exact-number (last number), boxed (\\boxed{...}), or a function (prompt, completion, answer) -> "
    "float as module:function or file.py:function [default: exact-number].",
)
@click.option(
    "--eval-cmd",
    metavar='"CMD {model_dir}"',
    help="Instead of --prompts/--reward: write each scale's model and run CMD on it; its last output line "
    'is the reward (a number, or JSON {"reward": r, "se": s}).',
)
@click.option(
    "--mode",
    type=click.Choice(["weights", "logits"]),
    default="weights",
    show_default=True,
    help="weights: the model at each scale; logits: z = z_base + alpha (z_1 - z_base).",
)
@sampling_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("-o", "--output", "out", default="driftmerge-sweep", show_default=True, help="Report folder.")
@click.option("--apply-best", metavar="DIR", help="Also write the model at the best scale into DIR.")
@click.option("--overwrite", is_flag=True, help="Replace the report folder (and --apply-best's) if they exist.")
def sweep_cmd(
    adapter: str,
    base: str | None,
    allow_other_base: bool,
    scales: list[float],
    prompts: str | None,
    reward: str | None,
    eval_cmd: str | None,
    mode: str,
    device: str,
    out: str,
    apply_best: str | None,
    overwrite: bool,
    **sampling: object,
) -> None:
    """Score each scale along the drift in ADAPTER with a verifiable reward and report the best one."""
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.options import ApplyOptions
    from driftmerge.commands.sweep import SweepOptions, preflight, run_sweep
    from driftmerge.evaluation.generation import SamplingOptions
    from driftmerge.io.outputs import atomic_output_dir
    from driftmerge.reports.linearity import pyplot
    from driftmerge.reports.sweep import text_table, write_outputs

    if eval_cmd is None and prompts is None:
        raise click.UsageError("give --prompts FILE (JSON lines with answers) to score, or --eval-cmd")
    if eval_cmd is not None and (prompts is not None or reward is not None):
        raise click.UsageError("--eval-cmd scores each model itself: leave out --prompts and --reward")
    if reward is None and eval_cmd is None:
        reward = "exact-number"
    sampler = SamplingOptions(**pop_sampling(sampling))
    opts = SweepOptions(scales, mode, reward, eval_cmd, sampler, device, allow_other_base=allow_other_base)
    opts.validate()
    if apply_best is not None and mode != "weights":
        raise click.UsageError("--apply-best writes a model at a scale: it needs --mode weights")
    pyplot("sweep")
    # fail before the long part: the base, the report folder and --apply-best's
    preflight(
        adapter, base=base, out=out, apply_best=apply_best, overwrite=overwrite, allow_other_base=allow_other_base
    )
    with progress_bar("sweep") as progress:
        result = run_sweep(adapter, prompts, opts=opts, base=base, progress=progress)
    settings = {
        "adapter": adapter,
        "base": base,
        "prompts": prompts,
        "reward": reward,
        "eval_cmd": eval_cmd,
        "sampling": vars(opts.sampling),
        "device": device,
        "command": command_line(),
    }
    with atomic_output_dir(out, [Path(adapter)], overwrite=overwrite) as tmp:
        write_outputs(result, tmp, settings=settings)
    best = result.best
    what = "alpha" if mode == "logits" else "scale"
    se = "" if best.se is None else f" ± {best.se:.4f}"
    click.echo(
        f"{text_table(result)}\n\nbest {what} {best.scale:g} (step {best.step:g}): mean reward {best.mean:.4f}"
        f"{se}\nwrote {out}: sweep.json, sweep.md, sweep.png" + (", completions.jsonl" if result.completions else "")
    )
    if apply_best is not None:
        with progress_bar("apply") as progress:
            applied = apply_drift(
                adapter,
                apply_best,
                options=ApplyOptions(
                    scale=best.scale,
                    base=base,
                    allow_negative_scale=True,  # the best of the scales the user listed
                    allow_other_base=allow_other_base,
                ),
                overwrite=overwrite,
                progress=progress,
                command=command_line(),
            )
        print_apply(applied, "model")
