"""Helpers shared by the commands: parameter types, the progress bar, the recorded command line."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from driftmerge_cli.options import ParsedText
from tqdm import tqdm

from driftmerge.progress import Progress

F = TypeVar("F", bound=Callable[..., Any])  # a click command function


class RankType(ParsedText):
    """``1`` or ``8`` (a fixed rank) or ``0.9`` (the share of drift energy to keep), read as ``extract --rank``."""

    def __init__(self) -> None:
        super().__init__(_parse_rank, "RANK")


class StepsType(ParsedText):
    """``100,200,300``, read as ``extract --steps``."""

    def __init__(self) -> None:
        super().__init__(_parse_steps, "S1,S2,...")


class SizeType(ParsedText):
    """``2GiB``, ``500MB`` or a byte count, read as ``extract --max-memory``."""

    def __init__(self) -> None:
        super().__init__(_parse_size, "SIZE")


def _parse_rank(text: str) -> int | float:
    from driftmerge.commands.options import parse_rank  # pydantic loads when a value is read, not for --help

    return parse_rank(text)


def _parse_steps(text: str) -> list[int]:
    from driftmerge.commands.options import parse_steps

    return parse_steps(text)


def _parse_size(text: str) -> int:
    from driftmerge.commands.options import parse_size_text

    return parse_size_text(text)


def command_line() -> str:
    """The command as the user typed it, for the model card."""
    return " ".join(shlex.quote(a) for a in ["driftmerge", *sys.argv[1:]])


@contextmanager
def progress_bar(desc: str) -> Iterator[Progress]:
    """A tqdm bar over tensors (on stderr, hidden when stderr is not a terminal)."""
    bar: tqdm | None = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None or bar.total != total:  # a new phase (extract, then apply) gets a new bar
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        bar.set_postfix_str(name[-40:], refresh=False)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class FloatListType(click.ParamType):
    """``0,0.5,1,1.5``."""

    name = "X1,X2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            return [float(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


def sampling_options(f: F) -> F:
    """The generation knobs ``sweep`` and ``generate`` share; the command receives them as keyword arguments."""
    options = [
        click.option("--samples", type=int, default=1, show_default=True, help="Completions per prompt."),
        click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Tokens per completion."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy decoding."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling share."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampling."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per generate call."),
        click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


SAMPLING_KEYS = ("samples", "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "chat")


def pop_sampling(kwargs: dict) -> dict:
    """Take the sampling options out of a command's keyword arguments."""
    return {k: kwargs.pop(k) for k in SAMPLING_KEYS}
