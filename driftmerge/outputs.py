"""Atomic output folders: everything is written to a temporary sibling and renamed into place at the end."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from driftmerge.errors import OutputError


def check_output_dir(target: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), or that overlaps an input folder."""
    target = target.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if target == inp or inp.is_relative_to(target):
            raise OutputError(f"{target}: the output folder would replace the input {inp}; choose another -o")
        if target.is_relative_to(inp):
            raise OutputError(f"{target}: the output folder lies inside the input {inp}; choose another -o")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder")
        if not overwrite:
            raise OutputError(f"{target}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(target: str | Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``, on failure it vanishes."""
    target = Path(target).absolute()
    check_output_dir(target, inputs, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"{target}: cannot create the output folder ({exc.strerror})") from exc
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"{target}: cannot write the output ({why}); nothing was left behind") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
