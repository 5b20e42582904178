"""``driftmerge extract BASE CHECKPOINT...``: fit the drift and write a PEFT adapter folder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from driftmerge_cli.common import command_line, human_bytes, progress_bar
from driftmerge_cli.options import LazyCommand, flag_options, later, options_from
from driftmerge_cli.push import check_push_target, push_after, push_option

if TYPE_CHECKING:  # the library (torch) loads when a command runs, so --help stays instant
    from driftmerge.commands.extract import ExtractResult


def _options() -> list[click.Parameter]:
    """The run-folder selection, -o, and the extract options (driftmerge.commands.options), in --help order."""
    from driftmerge.commands.flags import split_at_output
    from driftmerge.commands.options import ADAPTER_DIR, ExtractOptions, RunDirSelection

    before, after = split_at_output(ExtractOptions)
    output = click.Option(["-o", "--output"], default=ADAPTER_DIR, show_default=True, help="Adapter folder to write.")
    return [
        *flag_options(RunDirSelection),
        *flag_options(ExtractOptions, before),
        output,
        *flag_options(ExtractOptions, after),
    ]


@click.command("extract", cls=LazyCommand)
@click.argument("base", required=False, type=click.Path(path_type=str))
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@later(_options)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@push_option
def extract_cmd(
    base: str | None,
    checkpoints: tuple[str, ...],
    output: str,
    overwrite: bool,
    push_to_hub: str | None,
    hub_private: bool,
    **flags: Any,
) -> None:
    """Fit the linear drift from BASE through CHECKPOINT... (or the checkpoints of --run-dir) and store it as a PEFT
    LoRA adapter. With --run-dir, BASE may be left out when the run records it (adapter_config.json, model card)."""
    from driftmerge.commands.extract import extract
    from driftmerge.commands.options import ExtractOptions

    base, checkpoints = run_dir_inputs(base, checkpoints, flags)
    options = options_from(ExtractOptions, flags)
    check_push_target(push_to_hub)
    with progress_bar("extract") as progress:
        result = extract(
            base,
            list(checkpoints),
            out_dir=output,
            options=options,
            overwrite=overwrite,
            progress=progress,
            command=command_line(),
        )
    print_summary(result)
    push_after(result.out_dir, push_to_hub, hub_private)


def run_dir_inputs(
    base: str | None, checkpoints: tuple[str, ...], flags: dict[str, Any]
) -> tuple[str, tuple[str, ...]]:
    """BASE and the checkpoints: as given, or those --run-dir selects (takes its flags out of ``flags``), with the
    base the run records when BASE is left out; says on stderr what was taken. Shared by extract and analyze."""
    from driftmerge.commands.options import RunDirSelection
    from driftmerge.io.runbase import recorded_base

    run_dir = options_from(RunDirSelection, flags, optional=True)
    if run_dir is None:
        if base is None or not checkpoints:
            raise click.UsageError("give BASE and at least one CHECKPOINT, or --run-dir")
        return base, checkpoints
    if checkpoints:
        raise click.UsageError("give checkpoints either as arguments or with --run-dir, not both")
    took, found = run_dir.select()
    said = None
    if base is None:  # before any output: a missing record is the one line of the error
        recorded = recorded_base(run_dir.path, found)
        base, said = recorded.ref, f"base {recorded.ref}: recorded in {recorded.where} (give BASE to use another)"
    steps = ", ".join(str(f.step) for f in took)
    click.echo(f"run folder {run_dir.path}: took {len(took)} of {len(found)} checkpoints, steps {steps}", err=True)
    if said:
        click.echo(said, err=True)
    return base, tuple(str(f.path) for f in took)


def print_summary(result: ExtractResult, next_hint: bool = True) -> None:
    from driftmerge.hub.cards import extras_text

    m, s = result.meta, result.summary
    steps = ", ".join(str(c.step) for c in m.checkpoints)
    r2 = "n/a (needs 2+ checkpoints)" if s.median_r2 is None else f"{s.median_r2:.4f}"
    ranks = f"rank {s.rank_min}" if s.rank_min == s.rank_max else f"ranks {s.rank_min}-{s.rank_max}"
    ratio = s.adapter_bytes / max(s.checkpoint_bytes, 1)
    lines = [
        f"wrote {result.out_dir}",
        f"  checkpoints  {len(m.checkpoints)} at steps {steps} ({m.steps_source}); scale 1 = step {m.s_ref}",
        f"  tensors      {s.tensors} fitted: {s.lora_tensors} LoRA ({ranks}), "
        f"{s.extras_tensors} extras ({extras_text(s)}), {len(s.zero_tensors)} without drift (left out)",
        f"  energy kept  {s.energy_kept:.4f} of the LoRA tensors' drift energy ({m.fit} fit, {m.svd} SVD)",
        f"  median R²    {r2} (pooled R² of each tensor's line, median over tensors; see analyze)",
        f"  size         {human_bytes(s.adapter_bytes)} adapter vs {human_bytes(s.checkpoint_bytes)} checkpoint"
        f" ({ratio:.2%})",
        f"  not in PEFT  {100 * s.extras_share:.2f} % of the drift energy sits in drift_extras.safetensors"
        "; PEFT ignores it, `driftmerge apply` uses it",
    ]
    for r, (tensors, nbytes, seconds) in enumerate(result.ranks):
        lines.append(
            f"  rank {r}/{len(result.ranks)}   {tensors} tensors, {human_bytes(nbytes)} per input, {seconds:.1f} s"
        )
    if next_hint:
        lines.append(f"next: driftmerge apply {result.out_dir} --scale 1.5")
    click.echo("\n".join(lines))
