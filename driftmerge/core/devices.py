"""Devices and dtypes by name: where the math runs and in which precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from driftmerge.core.device_names import DEVICE_CHOICES, is_device
from driftmerge.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # floating dtypes by name
FACTOR_DTYPES = ("auto", *DTYPES)


def resolve_device(device: str) -> torch.device:
    if not is_device(device):
        raise InputError(f"--device: unknown device {device!r} (give {DEVICE_CHOICES})")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    return dev


def resolve_factor_dtype(name: str, device: torch.device) -> str:
    """``auto`` → ``bfloat16`` where the device multiplies bfloat16 natively (CUDA compute capability 8+, or a CPU
    with AVX512-BF16 / AMX), else ``float32``. The sketches accumulate in float32 either way, and the singular
    values and the kept energy always come from a float32 product (``lowrank.randomized_svd``)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float32"
    return "bfloat16" if device.type == "cpu" and _cpu_has_bf16() else "float32"


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay with float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def cpu_workers(device: torch.device) -> Iterator[int]:
    """How many matrices to factorize at once on ``device``: on the CPU, torch's thread count (one per core; 1
    under torchrun, which gives each rank one), with torch's own ops set to one thread meanwhile (restored after),
    so each worker keeps to its core; 1 elsewhere (a GPU runs a whole group as one batch)."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers <= 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(workers)
