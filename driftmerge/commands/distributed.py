"""Running ``extract`` and ``apply`` on several processes with torch.distributed (``torchrun``).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each rank takes a share of the tensors balanced by
bytes (:meth:`Dist.share`), reads only those, and works on its own device (``cuda:LOCAL_RANK`` with NCCL on GPUs,
the CPU with gloo). Results travel through a gloo group as pickled objects: the adapter's factors are small, and
``apply``'s shards are written by the rank that computed them into the shared temporary output folder. Without
torchrun everything runs in this process (a world of one).

Failures: every phase ends with :meth:`Dist.agree`, which all ranks reach whether their part succeeded or not; if
any rank failed, every rank raises (rank 0 with the failing rank's message), the temporary output is removed, and
nothing is left behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from driftmerge.errors import DriftmergeError

T = TypeVar("T")


class RankFailed(DriftmergeError):
    """Another rank failed; carries its message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # a gloo group for object collectives (None: a world of one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(
        self, names: Sequence[str], sizes: dict[str, int], *, group: Callable[[str], str] | None = None
    ) -> list[str]:
        """This rank's names: largest group first to the least-loaded rank (ties to the lowest rank), in input
        order; names of one ``group(name)`` (default: each its own) go to the same rank."""
        if self.world == 1:
            return list(names)
        key = group or (lambda n: n)
        totals: dict[str, int] = {}
        for name in names:
            totals[key(name)] = totals.get(key(name), 0) + sizes[name]
        load = [0] * self.world
        owner: dict[str, int] = {}
        for unit in sorted(totals, key=lambda u: (-totals[u], u)):
            r = min(range(self.world), key=lambda i: (load[i], i))
            owner[unit] = r
            load[r] += totals[unit]
        return [n for n in names if owner[key(n)] == self.rank]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (its own error where it failed)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        status = (
            None
            if error is None
            else (str(error).splitlines()[0] if str(error) else type(error).__name__, getattr(error, "exit_code", 1))
        )
        everyone = self.gather(status)
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(everyone) if s is not None]
        if failed:
            r, (message, code) = failed[0]
            raise RankFailed(f"rank {r} of {self.world}: {message}", code)

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this rank, then :meth:`agree` (so a failure anywhere stops every rank)."""
        try:
            result = fn()
        except BaseException as exc:
            self.agree(exc)
            raise
        self.agree(None)
        return result


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def distributed(cuda: bool) -> Iterator[Dist]:
    """A :class:`Dist` for this process: torchrun's ranks when ``WORLD_SIZE`` > 1 (NCCL when ``cuda``, else
    gloo; object collectives always on gloo), else a world of one. Initializes and tears down the process group
    unless the caller already has one."""
    if world_size() <= 1:
        yield Dist()
        return
    import torch
    import torch.distributed as td

    owned = not td.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if owned:
        if cuda:
            torch.cuda.set_device(local_rank)
        td.init_process_group(backend="nccl" if cuda else "gloo")
    group = td.new_group(backend="gloo") if td.get_backend() != "gloo" else td.group.WORLD
    try:
        yield Dist(td.get_rank(), td.get_world_size(), local_rank, group)
    finally:
        if owned:
            td.destroy_process_group()


def rank_of_environment() -> int:
    """This process's rank under torchrun (0 otherwise): non-zero ranks keep quiet on the console."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0
