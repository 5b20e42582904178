"""``driftmerge apply [ADAPTER] (--scale S | --step T)``: write the model (or a scaled adapter) along the drift."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from driftmerge_cli.common import command_line, human_bytes, progress_bar
from driftmerge_cli.push import check_push_target, push_after, push_option

if TYPE_CHECKING:
    from driftmerge.commands.apply import ApplyResult


@click.command("apply")
@click.argument("adapter", default="driftmerge-adapter", type=click.Path(path_type=str))  # or a Hub repo id
@click.option("--base", help="Base model folder [default: the one recorded in the adapter's driftmerge.json]")
@click.option("--scale", type=float, help="W = W0 + scale · drift (1 = the last checkpoint, >1 extrapolates).")
@click.option("--step", type=float, help="Target training step; mapped to a scale through the recorded steps.")
@click.option("-o", "--output", "out", help="Output folder [default: driftmerge-model, or driftmerge-adapter-scaled]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["model", "adapter"]),
    default="model",
    show_default=True,
    help="model: a full Hugging Face model; adapter: a PEFT adapter with the scale baked into lora_alpha.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="Storage dtype of the model (auto = the base's).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@push_option
def apply_cmd(adapter: str, base: str | None, scale: float | None, step: float | None, out: str | None, fmt: str,
              dtype: str, max_shard_size: str, overwrite: bool, push_to_hub: str | None,
              hub_private: bool) -> None:  # fmt: skip
    """Produce the model at --scale S (or --step T) along the drift stored in ADAPTER."""
    from driftmerge.commands.apply import apply_drift

    if (scale is None) == (step is None):
        raise click.UsageError("give exactly one of --scale or --step")
    out = out or ("driftmerge-model" if fmt == "model" else "driftmerge-adapter-scaled")
    check_push_target(push_to_hub)
    with progress_bar("apply") as progress:
        r = apply_drift(adapter, out, scale, step, base, fmt, dtype, max_shard_size, overwrite, progress,
                        command_line())  # fmt: skip
    print_apply(r, "model" if fmt == "model" else "scaled PEFT adapter")
    push_after(r.out_dir, push_to_hub, hub_private)


def print_apply(r: ApplyResult, what: str) -> None:
    """What ``apply`` wrote."""
    click.echo(
        f"wrote {what} {r.out_dir}\n"
        f"  scale {r.scale:g} (step {r.step:g}); {r.tensors_changed} of {r.tensors_total} tensors moved; "
        f"{r.shards} file(s), {human_bytes(r.bytes_written)}"
    )
