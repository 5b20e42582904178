"""The ``driftmerge`` console script: a click group whose errors end in one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import click
from driftmerge_cli.analyze import analyze_cmd
from driftmerge_cli.apply import apply_cmd
from driftmerge_cli.demo import demo_cmd
from driftmerge_cli.export_mergekit import export_mergekit_cmd
from driftmerge_cli.extract import extract_cmd
from driftmerge_cli.generate import generate_cmd
from driftmerge_cli.push import push_cmd
from driftmerge_cli.reground import reground_cmd
from driftmerge_cli.run import run_cmd
from driftmerge_cli.sweep import sweep_cmd

from driftmerge import __version__
from driftmerge.commands.distributed import rank_of_environment
from driftmerge.errors import DriftmergeError
from driftmerge.io.memory import keep_freed_buffers

EXIT_CODES = """Exit codes: 0 success, 1 unexpected failure, 2 bad usage (unknown option, missing argument),
3 bad input (path, weights, steps, shapes, values), 4 output problem (folder exists, overlaps an input, disk full)."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="driftmerge")
@click.option("-v", "--verbose", is_flag=True, help="Log what driftmerge decides (steps, architecture, groups).")
def cli(verbose: bool) -> None:
    """Fit the linear weight drift of an RLVR run into a PEFT LoRA adapter, and apply it at any scale."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="driftmerge: %(levelname)s: %(message)s"
    )


cli.add_command(extract_cmd)
cli.add_command(apply_cmd)
cli.add_command(demo_cmd)
cli.add_command(analyze_cmd)
cli.add_command(export_mergekit_cmd)
cli.add_command(push_cmd)
cli.add_command(run_cmd)
cli.add_command(sweep_cmd)
cli.add_command(generate_cmd)
cli.add_command(reground_cmd)


def main() -> None:
    """Run the CLI; a :class:`DriftmergeError` becomes one line on stderr and its exit code. Under torchrun only
    rank 0 prints (its errors name the rank that failed); the other ranks exit with the same code."""
    keep_freed_buffers()  # this process is ours: let large tensor buffers be reused instead of re-faulted
    if rank_of_environment() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this process)
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("driftmerge: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DriftmergeError as exc:
        if rank_of_environment() == 0:
            click.echo(f"driftmerge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("driftmerge: interrupted; no output was left behind", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
