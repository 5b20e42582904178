"""Atomic output folders: everything is written to a temporary sibling and renamed into place at the end.

Temporary siblings are named ``.NAME.tmp-HOST-PID-XXXXXXXX`` (``.NAME.old-…`` for a replaced output while it is
swapped out). A process killed outright (SIGKILL, power loss) cannot remove its own; the next run on the same host
writing to the same target removes those whose process no longer runs (siblings from other hosts are left alone).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from driftmerge.errors import OutputError

logger = logging.getLogger("driftmerge")


def check_output_dir(target: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
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
def atomic_output_dir(target: str | Path, inputs: Sequence[Path] = (), *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``, on failure it vanishes."""
    target = Path(target).absolute()
    check_output_dir(target, inputs, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)
        tmp = _sibling(target, "tmp")
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
    """Move ``tmp`` to ``target``; an existing target is exchanged atomically where the OS can (Linux
    ``renameat2(RENAME_EXCHANGE)``), else moved aside first (a kill in between leaves no target, never a mix)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with ``renameat2(..., RENAME_EXCHANGE)``; False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` left by driftmerge processes that no longer run; return them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for path in target.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and not _running(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, left behind by an interrupted driftmerge run", path)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_output_file(target: Path, overwrite: bool) -> None:
    """An output *file* may not be a folder, nor exist unless ``overwrite``."""
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give a file name with -o")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists; pass --overwrite to replace it")


def write_text_atomic(target: Path, text: str, *, overwrite: bool, what: str = "the file") -> None:
    """Write ``text`` to a temporary sibling and rename it over ``target`` (never a half-written file)."""
    check_output_file(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: cannot write {what} ({exc.strerror or exc})") from exc
        raise
