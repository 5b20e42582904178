"""Stream the deltas of many checkpoints against a base, tensor by tensor, within a memory budget.

A reader thread (:class:`~driftmerge.io.prefetch.Prefetcher`) loads single tensors — name by name, the base's copy
then each checkpoint's — up to ``read_ahead`` bytes ahead. safetensors hands out views of a file map that is read
from disk on first touch, so the reader copies the bytes out (into float32 on the CPU, pinned as stored for CUDA):
disk reads and conversion overlap the consumer's compute. Each copy is the consumer's, so a delta is formed in
place, and the file maps of all sources together stay near ``MAPPED_BYTES`` between releases. Every tensor taken
from the reader is checked to be the ``(name, j)`` expected; a read error raises at that tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from driftmerge.errors import InputError
from driftmerge.io.checkpoints import Checkpoint
from driftmerge.io.prefetch import Prefetcher

MAPPED_BYTES = 128 << 20  # file-map pages the sources may keep resident between releases, all together

Key = tuple[str, int]  # (tensor name, source index: 0 the base, j = 1..N the checkpoints)


def take(stream: Iterator[tuple[Key, torch.Tensor]], want: Key) -> torch.Tensor:
    """The next tensor of ``stream``, which must be the one for ``want``; ``RuntimeError`` names both otherwise."""
    got = next(stream, None)
    if got is None:
        raise RuntimeError(f"internal error: the read-ahead ended before tensor {want!r}")
    if got[0] != want:
        raise RuntimeError(
            f"internal error: the read-ahead handed over the wrong tensor: expected {want!r}, got {got[0]!r}"
        )
    return got[1]


def stream_deltas(
    names: list[str],
    sources: list[Checkpoint],
    *,
    device: torch.device,
    read_ahead: int,
    stats: dict[str, float] | None = None,
) -> Iterator[tuple[str, Iterator[tuple[int, torch.Tensor]]]]:
    """Yield ``(name, deltas)`` per tensor; ``deltas`` yields ``(j, D_j)`` for checkpoint j = 1..N (``sources`` is
    the base, then the checkpoints), each ``D_j = W_j - W_0`` a fresh float32 tensor on ``device`` that the consumer
    owns. Exhaust ``deltas`` before the next name (otherwise ``RuntimeError``: the next tensor read is not the one
    expected). ``stats["waited"]`` receives the seconds spent waiting for reads. ``sources`` may be read from the
    consumer's thread meanwhile (:meth:`Checkpoint.get` is locked), as :func:`raise_not_finite` does.
    """
    pin = device.type == "cuda"
    items: list[Key] = [(name, j) for name in names for j in range(len(sources))]
    for src in sources:
        src.release_after = max(MAPPED_BYTES // len(sources), 16 << 20)

    def load(item: Key) -> torch.Tensor:
        x = sources[item[1]].get(item[0])
        return x.pin_memory() if pin else x.to(torch.float32, copy=True)

    def size_of(item: Key) -> int:
        info = sources[0].infos[item[0]]
        return info.numel * (info.dtype.itemsize if pin else 4)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=torch.float32, non_blocking=True)

    with Prefetcher(items, load, size_of, read_ahead) as reader:
        stream = iter(reader)

        def deltas(name: str, w0: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
            for j in range(1, len(sources)):
                yield j, to_device(take(stream, (name, j))).sub_(w0)

        for name in names:
            w0 = to_device(take(stream, (name, 0)))  # (shape) base
            yield name, deltas(name, w0)
        if stats is not None:
            stats["waited"] = reader.waited


def raise_not_finite(name: str, base: Checkpoint, *, ckpt: Checkpoint) -> None:
    """Raise ``InputError`` naming which of ``base`` / ``ckpt`` holds NaN/Inf in ``name`` (or that W_j - W_0 overflows).

    Called while :func:`stream_deltas` still reads the same checkpoints on its thread: ``Checkpoint.get`` is locked.
    """
    for src in (base, ckpt):
        if not torch.isfinite(src.get(name)).all():
            raise InputError(f"{src.path}: tensor {name} holds NaN or Inf values; leave this checkpoint out")
    raise InputError(f"tensor {name}: the difference between {base.path} and {ckpt.path} overflows float32")
