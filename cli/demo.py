"""``driftmerge demo``: the embedded default job, no downloads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from driftmerge_cli.common import progress_bar
from driftmerge_cli.extract import print_summary


@click.command("demo")
@click.option("--keep", type=click.Path(path_type=Path), help="Keep the demo's files in this folder.")
def demo_cmd(keep: Path | None) -> None:
    """Build a tiny Llama-shaped RL run with a planted drift, extract it, extrapolate to scale 1.5."""
    from driftmerge.demo import DEMO_SCALE, run_demo

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="driftmerge-demo-") as tmp:
        folder = keep or Path(tmp)
        click.echo(f"driftmerge demo: a tiny Llama base + checkpoints 100, 200, 300 with a planted drift in {folder}")
        with progress_bar("demo") as progress:
            rep = run_demo(folder, progress)
        click.echo("\n$ driftmerge extract run/base run/checkpoint-100 run/checkpoint-200 run/checkpoint-300")
        print_summary(rep.extracted, next_hint=False)
        a = rep.applied
        click.echo(f"\n$ driftmerge apply driftmerge-adapter --scale {DEMO_SCALE}")
        click.echo(f"wrote {a.out_dir}: scale {a.scale:g} = step {a.step:g}; {a.tensors_changed} tensors moved")
        click.echo(
            f"\ncheck against the planted line at step {a.step:g}:\n"
            f"  extrapolated model   relative error {rep.err_extrapolated:.4f}\n"
            f"  last checkpoint      relative error {rep.err_last_checkpoint:.4f} (where training stopped)\n"
            f"  forward pass of the extrapolated model: logits {list(rep.logits_shape)}, all finite\n"
            f"done in {time.perf_counter() - t0:.1f} s.\n"
            "\nOn your own run:\n"
            "  driftmerge extract BASE_DIR RUN/checkpoint-* -o my-drift\n"
            "  driftmerge apply my-drift --scale 1.5 -o my-model"
        )
