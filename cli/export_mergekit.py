"""``driftmerge export-mergekit [ADAPTER] (--scale S | --step T)``: a mergekit config that rebuilds ``apply``."""

from __future__ import annotations

import click
from driftmerge_cli.common import command_line
from driftmerge_cli.options import options_from


@click.command("export-mergekit")
@click.argument("adapter", default="driftmerge-adapter", type=click.Path(path_type=str))
@click.option("--scale", type=float, help="W = W0 + scale · drift (1 = the last checkpoint, >1 extrapolates).")
@click.option("--step", type=float, help="Target training step; mapped to a scale through the recorded steps.")
@click.option(
    "--via",
    type=click.Choice(["checkpoints", "lora"]),
    default="checkpoints",
    show_default=True,
    help="checkpoints: task_arithmetic over the recorded checkpoints (the full-rank drift, extras included; lsq and "
    "endpoint fits); lora: task_arithmetic on BASE+ADAPTER (the adapter's LoRA part, without the extras).",
)
@click.option("--base", help="Base model folder [default: the one recorded in the adapter's driftmerge.json]")
@click.option("-o", "--output", "out", default="driftmerge-mergekit.yaml", show_default=True, help="Config to write.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="Storage dtype of the merged model, mergekit's out_dtype (auto = the base's); the arithmetic is float32.",
)
@click.option("--overwrite", is_flag=True, help="Replace the config file if it exists.")
def export_mergekit_cmd(
    adapter: str,
    scale: float | None,
    step: float | None,
    via: str,
    base: str | None,
    out: str,
    dtype: str,
    overwrite: bool,
) -> None:
    """Write a mergekit YAML that reproduces `driftmerge apply ADAPTER --scale S` with mergekit's task_arithmetic."""
    from driftmerge.commands.export_mergekit import export_mergekit
    from driftmerge.commands.flags import flags
    from driftmerge.commands.options import ApplyOptions

    # apply's rules for --scale / --step, with its exit codes (2: both or neither, 3: not a finite number)
    target = options_from(ApplyOptions, {**dict.fromkeys(flags(ApplyOptions)), "scale": scale, "step": step})
    r = export_mergekit(
        adapter,
        out,
        scale=target.scale,
        step=target.step,
        via=via,
        base=base,
        dtype=dtype,
        overwrite=overwrite,
        command=command_line(),
    )
    weights = ", ".join(f"{w:.6g}" for _, w in r.models)
    what = f"BASE+ADAPTER, weight {weights}" if via == "lora" else f"{len(r.models)} checkpoint(s), weights {weights}"
    lines = [
        f"wrote mergekit config {r.out_file}",
        f"  merge        task_arithmetic over {what}",
        f"  reproduces   driftmerge apply {adapter} --scale {r.scale:g} (step {r.step:g})",
        *(f"               {n}" for n in r.notes),
        f"run: {r.run}",
    ]
    click.echo("\n".join(lines))
