"""Atomic outputs: a folder (:func:`atomic_output_dir`) or a single file (:func:`atomic_output_file`) is written to a
temporary sibling and renamed into place at the end; a failure (read-only folder, full disk, Ctrl-C) removes the
sibling and ends in one :class:`OutputError` line.

Temporary siblings are named ``.NAME.tmp-HOST-PID-XXXXXXXX`` (``.NAME.old-…`` for a replaced output while it is
swapped out). A process killed outright (SIGKILL, power loss) cannot remove its own; the next run on the same host
writing to the same target removes those whose process no longer runs (siblings from other hosts are left alone).
"""

from __future__ import annotations

import contextlib
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
        raise OutputError(f"{target}: cannot create the output folder ({_why(exc)})") from exc
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise OutputError(f"{target}: cannot write the output ({_why(exc)}); nothing was left behind") from exc
    except BaseException:
        _discard(tmp)
        raise


def _why(exc: OSError) -> str:
    """What went wrong, for a one-line error: ``the disk is full``, ``Read-only file system``, …"""
    return "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))


def _discard(path: Path) -> None:
    """Remove a temporary sibling (a folder or a file), whatever state it is in; never raise (a read-only folder
    refuses even the removal of a file that was never created)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


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
            _discard(path)
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


@contextmanager
def atomic_output_file(target: str | Path, *, overwrite: bool = False, what: str = "the file") -> Iterator[Path]:
    """Yield an empty temporary file next to ``target`` (created at once, so a folder that cannot be written fails
    before any work); once the caller has written it and returns, it replaces ``target`` (``os.replace``: readers
    see the old file or the new one, never part of one). On failure it vanishes, and an ``OSError`` (read-only
    folder, full disk) becomes one :class:`OutputError` line."""
    target = Path(target).absolute()
    check_output_file(target, overwrite)
    tmp = _sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for any new file
    except OSError as exc:
        _discard(tmp)
        raise OutputError(f"{target}: cannot write {what} ({_why(exc)})") from exc
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise OutputError(f"{target}: cannot write {what} ({_why(exc)}); nothing was left behind") from exc
    except BaseException:
        _discard(tmp)
        raise


def write_text_atomic(target: str | Path, text: str, *, overwrite: bool, what: str = "the file") -> None:
    """Write ``text`` (UTF-8) to ``target`` through :func:`atomic_output_file` (never a half-written file)."""
    with atomic_output_file(target, overwrite=overwrite, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")
