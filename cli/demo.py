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
    """Extract the drift of a real tiny GRPO run (shipped with driftmerge), extrapolate it to scale 1.5 and score
    the models on held-out problems."""
    from driftmerge.commands.demo import DEMO_SCALE, DEMO_STEPS, run_demo

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="driftmerge-demo-") as tmp:
        folder = keep or Path(tmp)
        click.echo(
            f"driftmerge demo: a tiny Llama trained with GRPO on 2-digit addition (0/1 reward), base + checkpoints"
            f" {', '.join(map(str, DEMO_STEPS))}, copied to {folder}/run"
        )
        with progress_bar("demo") as progress:
            rep = run_demo(folder, progress)
        steps = " ".join(f"run/checkpoint-{s}" for s in DEMO_STEPS)
        click.echo(f"\n$ driftmerge extract run/base {steps}")
        print_summary(rep.extracted, next_hint=False)
        a = rep.applied
        click.echo(f"\n$ driftmerge apply driftmerge-adapter --scale {DEMO_SCALE}")
        click.echo(f"wrote {a.out_dir}: scale {a.scale:g} = step {a.step:g}; {a.tensors_changed} tensors moved")
        acc, last = rep.accuracy, DEMO_STEPS[-1]
        rows = [
            ("base (step 0, the supervised start)", acc["base"]),
            (f"last checkpoint (step {last})", acc["last"]),
            (f"rank-1 drift at scale 1 (step {last})", acc["rank1"]),
            (f"extrapolated, scale {DEMO_SCALE:g} (step {a.step:g})", acc["extrapolated"]),
        ]
        table = "\n".join(f"  {name:<40} {value:.3f}" for name, value in rows)
        click.echo(
            f"\nheld-out greedy accuracy on {rep.problems} addition problems:\n{table}\n"
            f"done in {time.perf_counter() - t0:.1f} s. Whether extrapolation helps depends on the run: measure it"
            " on yours with `driftmerge sweep`.\n"
            "\nOn your own run:\n"
            "  driftmerge extract BASE_DIR --run-dir RUN -o my-drift\n"
            "  driftmerge sweep my-drift --prompts tasks.jsonl --apply-best my-model"
        )
