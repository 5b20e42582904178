"""``driftmerge extract BASE CHECKPOINT...``: fit the drift and write a PEFT adapter folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from driftmerge_cli.common import RankType, SizeType, StepsType, command_line, human_bytes, progress_bar
from driftmerge_cli.push import check_push_target, push_after, push_option

if TYPE_CHECKING:  # the library (torch) loads when a command runs, so --help stays instant
    from driftmerge.commands.extract import ExtractResult


@click.command("extract")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@click.option("--run-dir", metavar="DIR", help="Take the checkpoints from a run folder (TRL, verl, step_N/) instead.")
@click.option("--every", type=int, metavar="K", help="With --run-dir: only steps that are multiples of K.")
@click.option("--last", type=int, metavar="N", help="With --run-dir: only the last N checkpoints.")
@click.option("--steps-range", metavar="A:B", help="With --run-dir: only steps A..B (A: or :B leave a side open).")
@click.option("-o", "--output", "out", default="driftmerge-adapter", show_default=True, help="Adapter folder to write.")
@click.option(
    "--steps",
    type=StepsType(),
    help="Checkpoint steps, e.g. 100,200,300 [default: from folder names, else 1..N]",
)
@click.option("--base-step", type=int, default=0, show_default=True, help="Step of the base model.")
@click.option("--rank", type=RankType(), default="1", show_default=True, help="Rank K, or an energy share like 0.9.")
@click.option(
    "--fit",
    type=click.Choice(["lsq", "pca", "endpoint"]),
    default="lsq",
    show_default=True,
    help="lsq: least-squares line through the base; pca: RELEX rank-1 trajectory; endpoint: last delta.",
)
@click.option(
    "--svd",
    type=click.Choice(["randomized", "exact"]),
    default="randomized",
    show_default=True,
    help="Factorization: seeded randomized subspace iteration, or a full SVD for reference.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:i]: where the fit and the factorization run.",
)
@click.option(
    "--factor-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Dtype of the sketching matmuls (float32 accumulate; singular values from a float32 product). "
    "auto: bfloat16 where the device multiplies it natively (CUDA sm80+, AVX512-BF16/AMX CPUs), else float32.",
)
@click.option("--include", metavar="REGEX", help="Only fit tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Leave out tensors whose name matches (the base is kept for them).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized factorization.")
@click.option(
    "--max-memory",
    type=SizeType("--max-memory"),
    default="1GiB",
    show_default=True,
    help="Budget for read-ahead and drift matrices awaiting factorization; peak use adds a few copies of the "
    "largest tensor. Changes speed, never the result.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@push_option
def extract_cmd(
    base: str,
    checkpoints: tuple[str, ...],
    out: str,
    overwrite: bool,
    run_dir: str | None,
    every: int | None,
    last: int | None,
    steps_range: str | None,
    push_to_hub: str | None,
    hub_private: bool,
    **opts: object,
) -> None:
    """Fit the linear drift from BASE through CHECKPOINT... (or the checkpoints of --run-dir) and store it as a PEFT
    LoRA adapter."""
    from driftmerge.commands.extract import ExtractOptions, extract

    if run_dir is None and (every, last, steps_range) != (None, None, None):
        raise click.UsageError("--every, --last and --steps-range select from a --run-dir")
    if run_dir is not None:
        if checkpoints:
            raise click.UsageError("give checkpoints either as arguments or with --run-dir, not both")
        checkpoints = _from_run_dir(run_dir, every, last, steps_range)
    elif not checkpoints:
        raise click.UsageError("give at least one CHECKPOINT after BASE, or --run-dir")
    options = ExtractOptions(**opts)  # type: ignore[arg-type]
    check_push_target(push_to_hub)
    with progress_bar("extract") as progress:
        result = extract(base, list(checkpoints), out, options, overwrite, progress, command_line())
    print_summary(result)
    push_after(result.out_dir, push_to_hub, hub_private)


def _from_run_dir(run_dir: str, every: int | None, last: int | None, steps_range: str | None) -> tuple[str, ...]:
    from driftmerge.io.rundirs import discover, select

    found = discover(run_dir)
    took = select(found, every, last, steps_range)
    steps = ", ".join(str(f.step) for f in took)
    click.echo(f"run folder {run_dir}: took {len(took)} of {len(found)} checkpoints, steps {steps}", err=True)
    return tuple(str(f.path) for f in took)


def print_summary(result: ExtractResult, next_hint: bool = True) -> None:
    m, s = result.meta, result.summary
    steps = ", ".join(str(c["step"]) for c in m["checkpoints"])
    r2 = "n/a (needs 2+ checkpoints)" if s["median_r2"] is None else f"{s['median_r2']:.4f}"
    ranks = f"rank {s['rank_min']}" if s["rank_min"] == s["rank_max"] else f"ranks {s['rank_min']}-{s['rank_max']}"
    ratio = s["adapter_bytes"] / max(s["checkpoint_bytes"], 1)
    lines = [
        f"wrote {result.out_dir}",
        f"  checkpoints  {len(m['checkpoints'])} at steps {steps} ({m['steps_source']}); scale 1 = step {m['s_ref']}",
        f"  tensors      {s['tensors']} fitted: {s['lora_tensors']} LoRA ({ranks}), "
        f"{s['extras_tensors']} full-rank extras, {len(s['zero_tensors'])} without drift (left out)",
        f"  energy kept  {s['energy_kept']:.4f} of the LoRA tensors' drift energy ({m['fit']} fit, {m['svd']} SVD)",
        f"  median R²    {r2}",
        f"  size         {human_bytes(s['adapter_bytes'])} adapter vs {human_bytes(s['checkpoint_bytes'])} checkpoint"
        f" ({ratio:.2%})",
        f"  not in PEFT  {100 * s['extras_share']:.2f} % of the drift energy sits in drift_extras.safetensors"
        " (norms, biases); PEFT ignores it, `driftmerge apply` uses it",
    ]
    for r, (tensors, nbytes, seconds) in enumerate(result.ranks):
        lines.append(
            f"  rank {r}/{len(result.ranks)}   {tensors} tensors, {human_bytes(nbytes)} per input, {seconds:.1f} s"
        )
    if next_hint:
        lines.append(f"next: driftmerge apply {result.out_dir} --scale 1.5")
    click.echo("\n".join(lines))
