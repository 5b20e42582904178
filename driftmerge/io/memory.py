"""Sizes on the command line, and the process allocator setting that keeps large tensor buffers reusable.

glibc returns every freed block above its mmap threshold (at most 32 MiB) to the kernel, so each new large
tensor costs fresh page faults: for a stream of same-size tensors that is most of the time spent. Raising the
threshold keeps freed buffers in the heap for the next tensor; peak RSS stays the peak of live tensors.
(Threads keep their own malloc arenas: one arena for all of them saved 0.05 s on a 0.4B extract but, shared by the
read-ahead thread, the main thread and the factorization workers, fragmented until peak RSS grew with the number
of checkpoints, 1.2 → 1.7 GiB at six; bench/RESULTS.md.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re

from driftmerge.errors import InputError

logger = logging.getLogger("driftmerge")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def parse_size(text: str | int, flag: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count → bytes; ``flag`` names the option in the error."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise InputError(f"{flag}: not a size like 5GB or 500MB: {text!r}")
    unit = m.group(2).rstrip("B") or ""
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "KI": 1, "MI": 2, "GI": 3, "TI": 4}[unit]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def keep_freed_buffers(limit: int = 1 << 30) -> int:
    """Ask glibc to keep freed blocks up to ``limit`` bytes for reuse (process-wide; the CLI calls it once).

    Some glibc versions refuse a threshold above 32 MiB; then 32 MiB is used. Returns the threshold set, or 0
    (changing nothing) where the C library is not glibc or refuses both.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return 0
    for threshold in (limit, min(limit, 32 << 20)):
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
            logger.info("allocator: freed blocks up to %d MiB kept for reuse", threshold >> 20)
            return threshold
    return 0
