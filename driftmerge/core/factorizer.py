"""Batched factorization of many drift matrices within a memory budget (pure math, no I/O)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from driftmerge.core.lowrank import Factor, factorize, matrix_seed

logger = logging.getLogger("driftmerge")


class GroupFactorizer:
    """Collect drift matrices by shape and factorize each shape's group as one batch.

    A group goes as soon as it holds ``BATCH_BYTES`` (so factorization overlaps the reads still running on the
    reader thread), and every group goes when all pending matrices reach ``max_bytes`` (the memory budget).
    Every matrix draws its own seed from its name and the factorization of one matrix never depends on which
    others share its batch, so the budget changes only speed and memory, never the result.
    """

    BATCH_BYTES = 64 << 20

    def __init__(self, opts: Any, compute_dtype: torch.dtype, max_bytes: int):
        self.opts, self.compute_dtype, self.max_bytes = opts, compute_dtype, max_bytes
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        self.group_bytes: dict[tuple[int, int], int] = {}
        self.done: dict[str, Factor] = {}
        self.transposed: set[str] = set()
        self.batches = 0
        self.seconds = 0.0

    def add(self, name: str, matrix: torch.Tensor, *, transposed: bool = False) -> None:
        """Queue ``matrix`` (contiguous); ``transposed``: the factors wanted are those of ``matrixᵀ``."""
        if transposed:
            self.transposed.add(name)
        shape = (matrix.shape[0], matrix.shape[1])
        self.pending.setdefault(shape, []).append((name, matrix))
        self.group_bytes[shape] = self.group_bytes.get(shape, 0) + matrix.numel() * matrix.element_size()
        if sum(self.group_bytes.values()) >= self.max_bytes:
            for key in list(self.pending):
                self._run(key)
        elif self.group_bytes[shape] >= min(self.BATCH_BYTES, self.max_bytes):
            self._run(shape)

    def finish(self) -> dict[str, Factor]:
        for key in list(self.pending):
            self._run(key)
        its = [f.iterations for f in self.done.values()]
        logger.info(
            "factorized %d matrices in %d batches; power iterations %d to %d",
            len(self.done),
            self.batches,
            min(its, default=0),
            max(its, default=0),
        )
        return self.done

    def _run(self, shape: tuple[int, int]) -> None:
        o, t0 = self.opts, time.perf_counter()
        group = self.pending.pop(shape)
        del self.group_bytes[shape]
        names, mats = [n for n, _ in group], [m for _, m in group]
        del group
        seeds = [matrix_seed(o.seed, n) for n in names]
        factors = factorize(
            mats,
            o.rank,
            seeds=seeds,
            method=o.svd,
            niter=o.niter,
            oversample=o.oversample,
            compute_dtype=self.compute_dtype,
        )
        for name, f in zip(names, factors, strict=True):
            if name in self.transposed:  # M = B A, so Mᵀ = Aᵀ Bᵀ: factorized in the stored (fast) layout
                f = Factor(B=f.A.T.contiguous(), A=f.B.T.contiguous(), energy=f.energy, iterations=f.iterations)
            self.done[name] = f
        self.batches += 1
        self.seconds += time.perf_counter() - t0
