"""``driftmerge apply [ADAPTER] (--scale S | --step T)``: write the model (or a scaled adapter) along the drift."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from driftmerge_cli.common import command_line, human_bytes, progress_bar
from driftmerge_cli.options import LazyCommand, flag_options, later, options_from
from driftmerge_cli.push import check_push_target, push_after, push_option

if TYPE_CHECKING:
    from driftmerge.commands.apply import ApplyResult


def _params() -> list[click.Parameter]:
    """ADAPTER, the apply options (driftmerge.commands.options) and -o among them, in --help order."""
    from driftmerge.commands.flags import split_at_output
    from driftmerge.commands.options import ADAPTER_DIR, APPLY_OUTPUTS, ApplyOptions

    before, after = split_at_output(ApplyOptions)
    adapter = click.Argument(["adapter"], default=ADAPTER_DIR, type=click.Path(path_type=str))  # or a Hub repo id
    output = click.Option(["-o", "--output"], help=f"Output folder [default: {', or '.join(APPLY_OUTPUTS.values())}]")
    return [adapter, *flag_options(ApplyOptions, before), output, *flag_options(ApplyOptions, after)]


@click.command("apply", cls=LazyCommand)
@later(_params)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@push_option
def apply_cmd(
    adapter: str, output: str | None, overwrite: bool, push_to_hub: str | None, hub_private: bool, **flags: Any
) -> None:
    """Produce the model at --scale S (or --step T) along the drift stored in ADAPTER."""
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.options import ApplyOptions

    options = options_from(ApplyOptions, flags)
    check_push_target(push_to_hub)
    with progress_bar("apply") as progress:
        r = apply_drift(
            adapter,
            output or options.default_output,
            options=options,
            overwrite=overwrite,
            progress=progress,
            command=command_line(),
        )
    print_apply(r, options.writes)
    push_after(r.out_dir, push_to_hub, hub_private)


def print_apply(r: ApplyResult, what: str) -> None:
    """What ``apply`` wrote."""
    click.echo(
        f"wrote {what} {r.out_dir}\n"
        f"  scale {r.scale:g} (step {r.step:g}); {r.tensors_changed} of {r.tensors_total} tensors moved; "
        f"{r.shards} file{'s' * (r.shards > 1)}, {human_bytes(r.bytes_written)}"
    )
