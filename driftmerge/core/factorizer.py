"""Batched factorization of many drift matrices within a memory budget (pure math, no I/O)."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from driftmerge.core import sums
from driftmerge.core.lowrank import Factor, factorize, matrix_seed

logger = logging.getLogger("driftmerge")


class GroupFactorizer:
    """Factorize drift matrices as they come, within a memory budget.

    With ``batched`` (a GPU), matrices are collected by shape and each shape's group goes as one batch as soon as
    it holds ``BATCH_BYTES`` (so factorization overlaps the reads still running on the reader thread), and every
    group goes when all pending matrices reach ``max_bytes`` (the memory budget). Otherwise (the CPU, where a batch
    runs one matrix at a time anyway) each matrix goes as it comes: with ``workers`` > 1 as one job on that many
    threads, each op single-threaded (the caller sets torch's threads to 1:
    :func:`driftmerge.core.devices.cpu_workers`), so two cores factorize two matrices at once (faster than one
    matrix on two threads, and a single-threaded result is the same whichever worker computes it). Jobs not yet
    done count against ``IN_FLIGHT_BYTES`` per worker (at least one job each) and ``max_bytes``: :meth:`add` waits
    for the oldest when they would pass either. Every matrix draws its own seed from its name and the
    factorization of one matrix never depends on which others share its batch, so the budget and the workers
    change only speed and memory, never the result.
    """

    BATCH_BYTES = 64 << 20
    IN_FLIGHT_BYTES = 64 << 20  # per worker: enough to keep it busy while the main thread forms the next drift

    def __init__(
        self, opts: Any, compute_dtype: torch.dtype, max_bytes: int, *, workers: int = 1, batched: bool = False
    ):
        self.batched = batched
        self.opts, self.compute_dtype, self.max_bytes = opts, compute_dtype, max_bytes
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor, float | None]]] = {}
        self.group_bytes: dict[tuple[int, int], int] = {}
        self.done: dict[str, Factor] = {}
        self.transposed: set[str] = set()
        self.batches = 0
        self.seconds = 0.0  # time spent factorizing, summed over the workers
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="driftmerge-factor") if workers > 1 else None
        self._running: deque[tuple[str, Future[tuple[list[Factor], float]], int]] = deque()  # (name, job, bytes)
        self._running_bytes = 0

    def add(self, name: str, matrix: torch.Tensor, *, transposed: bool = False, sq_norm: float | None = None) -> None:
        """Queue ``matrix`` (contiguous); ``transposed``: the factors wanted are those of ``matrixᵀ``;
        ``sq_norm``: its ``‖M‖_F²`` when known (:func:`driftmerge.core.sums.sq_norm`), computed otherwise."""
        if transposed:
            self.transposed.add(name)
        if not self.batched:
            self._send([(name, matrix, sq_norm)])
            return
        shape = (matrix.shape[0], matrix.shape[1])
        self.pending.setdefault(shape, []).append((name, matrix, sq_norm))
        self.group_bytes[shape] = self.group_bytes.get(shape, 0) + matrix.numel() * matrix.element_size()
        if sum(self.group_bytes.values()) + self._running_bytes >= self.max_bytes:
            for key in list(self.pending):
                self._run(key)
        elif self.group_bytes[shape] >= min(self.BATCH_BYTES, self.max_bytes):
            self._run(shape)

    def finish(self) -> dict[str, Factor]:
        for key in list(self.pending):
            self._run(key)
        while self._running:
            self._collect()
        self.close()
        its = [f.iterations for f in self.done.values()]
        logger.info(
            "factorized %d matrices in %d batches; power iterations %d to %d",
            len(self.done),
            self.batches,
            min(its, default=0),
            max(its, default=0),
        )
        return self.done

    def close(self) -> None:
        """Stop the workers: jobs not started are dropped, running ones end (each is one matrix)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._running.clear()
        self._running_bytes = 0

    def _run(self, shape: tuple[int, int]) -> None:
        group = self.pending.pop(shape)
        del self.group_bytes[shape]
        self._send(group)

    def _send(self, group: list[tuple[str, torch.Tensor, float | None]]) -> None:
        """Factorize a group now, or (with workers) hand each matrix to them as a job."""
        self.batches += 1
        if self._pool is not None:
            limit = min(self.max_bytes, self.IN_FLIGHT_BYTES * self.workers)
            for name, matrix, sq in group:
                size = matrix.numel() * matrix.element_size()
                while len(self._running) >= self.workers and self._running_bytes + size > limit:
                    self._collect()  # the oldest job first: what is in flight stays within the limit
                job = self._pool.submit(self._factorize, [name], [matrix], [sq])
                self._running.append((name, job, size))
                self._running_bytes += size
            return
        names, mats, sqs = [n for n, _, _ in group], [m for _, m, _ in group], [sq for _, _, sq in group]
        factors, seconds = self._factorize(names, mats, sqs)
        self.seconds += seconds
        for name, f in zip(names, factors, strict=True):
            self._keep(name, f)

    def _collect(self) -> None:
        """Wait for the oldest job sent to the workers and keep its factor (its error, if any, is raised here)."""
        name, job, size = self._running.popleft()
        (f,), seconds = job.result()
        self._running_bytes -= size
        self.seconds += seconds
        self._keep(name, f)

    def _factorize(
        self, names: list[str], mats: list[torch.Tensor], sqs: list[float | None]
    ) -> tuple[list[Factor], float]:
        """The factors of one group (or one matrix, on a worker) and the seconds they took."""
        o, t0 = self.opts, time.perf_counter()
        factors = factorize(
            mats,
            o.rank,
            seeds=[matrix_seed(o.seed, n) for n in names],
            method=o.svd,
            niter=o.niter,
            oversample=o.oversample,
            compute_dtype=self.compute_dtype,
            sq_norms=[sq if sq is not None else sums.sq_norm(m) for m, sq in zip(mats, sqs, strict=True)],
        )
        return factors, time.perf_counter() - t0

    def _keep(self, name: str, f: Factor) -> None:
        if name in self.transposed:  # M = B A, so Mᵀ = Aᵀ Bᵀ: factorized in the stored (fast) layout
            f = Factor(B=f.A.T.contiguous(), A=f.B.T.contiguous(), energy=f.energy, iterations=f.iterations)
        self.done[name] = f
