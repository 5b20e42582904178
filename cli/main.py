"""The ``driftmerge`` console script: a click group whose errors end in one line and an exit code."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from typing import Any

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
3 bad input (path, weights, steps, shapes, values), 4 output problem (folder exists, overlaps an input, disk full),
130 interrupted (Ctrl-C; no partial output is left behind)."""
INTERRUPTED = "driftmerge: interrupted; no partial output was left behind"


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) inside a command, carried past click (which would turn a KeyboardInterrupt into an Abort,
    exit code 1, after a blank line) to :func:`main`, which exits with 130."""


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Interrupted from exc


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
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
    """Run the CLI; a :class:`DriftmergeError` becomes one line on stderr and its exit code, Ctrl-C one line and
    130. Under torchrun only rank 0 prints (its errors name the rank that failed); the other ranks exit with the
    same code."""
    keep_freed_buffers()  # this process is ours: let large tensor buffers be reused instead of re-faulted
    if rank_of_environment() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this process)
    code = _run()
    # The command is over: from Python's own shutdown on (atexit hooks, finalization), a Ctrl-C would only turn this
    # exit into a traceback or a death by SIGINT. Hooks run last-registered first, so this one runs before the rest.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def entry() -> None:
    """The console script and ``python -m driftmerge``: :func:`main`, then a quick exit.

    Python's own shutdown after ``import torch`` (finalizing every module) takes a third of a second on 2 cores, a
    tenth of a small extract (bench/RESULTS.md). By then the command is over and its outputs are in place, so the
    atexit hooks run (the read-ahead's closer, logging's flush), the streams are flushed, and ``os._exit`` ends the
    process with the command's exit code. An unexpected exception still goes the normal way, with its traceback.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:  # sys.exit("message"): printed, exit code 1
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()  # what the interpreter would run first at exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            stream.flush()
    os._exit(code)


def _run() -> int:
    """The command's exit code, its error (or interruption) printed in one line."""
    try:
        rc = cli.main(standalone_mode=False)
    except (Interrupted, KeyboardInterrupt):
        return _interrupted()
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Ctrl-C while click read the command line
            return _interrupted()
        click.echo("driftmerge: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DriftmergeError as exc:
        if rank_of_environment() == 0:
            click.echo(f"driftmerge: error: {exc}", err=True)
        return exc.exit_code
    return rc if isinstance(rc, int) else 0


def _interrupted() -> int:
    """One line and exit code 130 (128 + SIGINT); every output was written to a temporary sibling, which the
    interrupted command removed on its way out."""
    if rank_of_environment() == 0:
        if sys.stderr.isatty():
            click.echo(err=True)  # end the line the terminal's ^C echo started
        click.echo(INTERRUPTED, err=True)
    return 130


if __name__ == "__main__":
    entry()
