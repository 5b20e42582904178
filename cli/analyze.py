"""``driftmerge analyze BASE CHECKPOINT...``, ``driftmerge analyze [BASE] --run-dir DIR`` or ``driftmerge analyze
ADAPTER``: linearity and rank evidence."""

from __future__ import annotations

from typing import Any

import click
from driftmerge_cli.common import SizeType, StepsType, progress_bar
from driftmerge_cli.extract import run_dir_inputs
from driftmerge_cli.options import LazyCommand, flag_options, later


def _run_dir_options() -> list[click.Parameter]:
    from driftmerge.commands.options import RunDirSelection

    return flag_options(RunDirSelection)


@click.command("analyze", cls=LazyCommand)
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@later(_run_dir_options)
@click.option("-o", "--output", "out", default="driftmerge-report", show_default=True, help="Report folder to write.")
@click.option("--steps", type=StepsType(), help="Checkpoint steps [default: from folder names, else 1..N]")
@click.option("--base-step", type=int, default=0, show_default=True, help="Step of the base model.")
@click.option(
    "--sample-frac",
    type=float,
    default=1e-3,
    show_default=True,
    help="Share of each tensor's elements sampled (seeded) for per-element R².",
)
@click.option(
    "--min-sample",
    type=int,
    default=1000,
    show_default=True,
    help="...but at least this many elements per tensor (all of a smaller tensor).",
)
@click.option("--spectrum", type=int, default=8, show_default=True, help="Report energy in the top 1, 2, 4, ... K.")
@click.option(
    "--min-move",
    type=float,
    default=0.1,
    show_default=True,
    help="Leave out sampled elements whose range is below this times the sample's median range.",
)
@click.option("--logprobs", type=click.Path(path_type=str), help="JSONL of {prompt, response}: log-prob linearity.")
@click.option("--logprob-min-move", type=float, default=0.2, show_default=True, help="Keep tokens that moved more.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i] for the statistics and scoring.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the element sample.")
@click.option(
    "--max-memory",
    type=SizeType(),
    default="1GiB",
    show_default=True,
    help="Memory for reading tensors ahead of the pass (changes speed, not the report).",
)
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
def analyze_cmd(paths: tuple[str, ...], out: str, overwrite: bool, **opts: Any) -> None:
    """How linear was the run BASE → CHECKPOINT... (or the checkpoints of --run-dir; BASE may then be left out when
    the run records it), and how much of each drift does rank 1 hold.

    With a single ADAPTER folder, render what `driftmerge extract` recorded in it instead.
    """
    import textwrap
    from pathlib import Path

    from driftmerge.commands.analyze import AnalyzeOptions, analyze, analyze_adapter
    from driftmerge.commands.flags import flags
    from driftmerge.commands.options import RunDirSelection
    from driftmerge.io.adapter import META
    from driftmerge.reports.linearity import legend

    run_dir = {name: opts.pop(name) for name in flags(RunDirSelection)}
    if len(paths) == 1 and all(v is None for v in run_dir.values()) and (Path(paths[0]) / META).is_file():
        result = analyze_adapter(paths[0], out, overwrite=overwrite)
    else:
        base, checkpoints = run_dir_inputs(paths[0] if paths else None, paths[1:], run_dir)
        with progress_bar("analyze") as progress:
            result = analyze(
                base,
                list(checkpoints),
                out_dir=out,
                options=AnalyzeOptions(**opts),
                overwrite=overwrite,
                progress=progress,
            )
    rows = result.table()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lp = result.report.get("logprobs")
    if lp:
        med = "n/a" if lp["r2_median"] is None else f"{lp['r2_median']:.3f}"
        lines.append(f"log-probs: {lp['kept']} of {lp['tokens']} tokens moved > {lp['min_move']}; median R² {med}")
    for text in [*legend(result.report), *result.report["notes"]]:  # what the columns mean, then the warnings
        lines += textwrap.wrap(text, 116, subsequent_indent="  ", break_on_hyphens=False)
    left_out = f" ({len(result.skipped)} left out: see report.md)" if result.skipped else ""
    lines.append(f"wrote {result.out_dir}: report.json, report.md, {len(result.figures)} figures{left_out}")
    click.echo("\n".join(lines))
