"""``driftmerge demo``: the embedded default job, no downloads."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
from driftmerge_cli.common import progress_bar
from driftmerge_cli.extract import print_summary


def user_path(path: Path) -> str:
    """``path`` as the user can type it where they stand: relative to the current folder when that is shorter,
    else absolute."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive (Windows)
        return absolute
    return relative if len(relative) <= len(absolute) else absolute


@click.command("demo")
@click.option(
    "--keep", type=click.Path(path_type=Path), help="Keep the demo's files in this folder (it must not exist yet)."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the --keep folder if it exists (the old one stays until the new one is complete).",
)
def demo_cmd(keep: Path | None, overwrite: bool) -> None:
    """Extract the drift of a real tiny GRPO run (shipped with driftmerge), extrapolate it to scale 1.5 and score
    the models on held-out problems."""
    from driftmerge.commands.demo import DEMO_SCALE, DEMO_STEPS, apply_command, extract_command, run_demo, setting

    if overwrite and keep is None:
        raise click.UsageError("--overwrite replaces the --keep folder; give --keep DIR")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="driftmerge-demo-") as tmp:
        folder = keep if keep is not None else Path(tmp) / "demo"
        heading = (
            f"driftmerge demo: a tiny Llama trained with GRPO on 2-digit addition (0/1 reward; {setting()}),"
            f" base + checkpoints {', '.join(map(str, DEMO_STEPS))}, copied to {user_path(folder / 'run')}"
        )
        with progress_bar("demo") as progress:  # the heading once the folder could be made, not before
            rep = run_demo(folder, progress, overwrite=overwrite, started=lambda: click.echo(heading))
        click.echo(f"\n$ {extract_command(rep.folder, user_path)}")
        print_summary(replace(rep.extracted, out_dir=Path(user_path(rep.extracted.out_dir))), next_hint=False)
        a = rep.applied
        click.echo(f"\n$ {apply_command(rep.folder, user_path)}")
        click.echo(
            f"wrote {user_path(a.out_dir)}: scale {a.scale:g} = step {a.step:g}; {a.tensors_changed} tensors moved"
        )
        acc, last = rep.accuracy, DEMO_STEPS[-1]
        rows = [
            ("base (step 0, the supervised start)", acc["base"]),
            (f"last checkpoint (step {last})", acc["last"]),
            (f"rank-1 drift at scale 1 (step {last})", acc["rank1"]),
            (f"extrapolated, scale {DEMO_SCALE:g} (step {a.step:g})", acc["extrapolated"]),
        ]
        table = "\n".join(f"  {name:<40} {value:.3f}" for name, value in rows)
        if keep is not None:  # a command to type as is
            another = apply_command(rep.folder, user_path, scale=2, out="model-scale-2")
            kept = f"\n\nAnother scale, on the kept files:\n  {another}"
        else:
            kept = "\n(those files were in a temporary folder, now removed; --keep DIR keeps them)"
        lin, gain = rep.linearity, rep.extrapolation_gain
        finding = (
            f"On this run `driftmerge analyze` finds pooled R² {lin['r2']:.2f}, per-element R² median"
            f" {lin['elem_r2_median']:.2f} and rank-1 energy {lin['energy_rank1']:.2f}; extrapolating to scale"
            f" {DEMO_SCALE:g} {'helped' if gain > 0 else 'did not help'} ({gain:+.3f} against the last checkpoint)."
        )
        click.echo(
            f"\nheld-out greedy accuracy on {rep.problems} addition problems:\n{table}\n{finding}\n"
            f"done in {time.perf_counter() - t0:.1f} s. Whether extrapolation helps depends on the run"
            f" (docs/validation.md, 'Regimes'): measure it on yours with `driftmerge sweep`.{kept}\n"
            "\nOn your own run:\n"
            "  driftmerge extract BASE_DIR --run-dir RUN -o my-drift\n"
            "  driftmerge sweep my-drift --prompts tasks.jsonl --apply-best my-model"
        )
