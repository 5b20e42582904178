"""Streaming per-tensor fit of the drift line through a base and its checkpoints (pure math, no I/O).

Notation (docs/design.md §2.1–2.3): base ``W_0`` at step ``s_base``; checkpoints ``W_i`` at steps ``s_i``; deltas
``D_i = W_i - W_0``; relative steps ``t_i = s_i - s_base``; reference ``t_ref = s_N - s_base``.

Fits:

- ``lsq``:      ``v = Σ t_i D_i / Σ t_i²``, drift ``D = t_ref · v`` (the line through the base; with one
                checkpoint exactly ``D_1``).
- ``pca``:      RELEX rank-1 trajectory: top right singular vector ``v`` of the stacked deltas (Gram trick),
                coefficients ``c_i = D_i · v``, least-squares line ``c(t) = a t + b`` over the base ``(0, 0)`` and
                the checkpoints, drift ``D = c(t_ref) · v``.
- ``endpoint``: ``D = D_N``.

Linearity R², pooled over elements, for the per-element least-squares line *with intercept* through the
points (base and checkpoints, n = N + 1):
``R² = 1 - Σ_e SS_res,e / Σ_e SS_tot,e`` with ``SS_tot,e = Σ_j y_j² - (Σ_j y_j)² / n`` and
``SS_res,e = SS_tot,e - S_ty,e² / S_tt``, ``S_ty,e = Σ_j t_j y_j - t̄ Σ_j y_j``, ``S_tt = Σ_j t_j² - n t̄²``.
It needs only ``Σ t_i D_i``, ``Σ D_i`` and ``Σ ‖D_i‖²``, so the deltas stream through one at a time.
None with fewer than 3 points or no movement at all. :func:`pooled_sums` and :func:`pooled_r2` compute it, for
the streaming fit here and for the Gram matrix of :mod:`driftmerge.core.linearity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from driftmerge.core.sums import dot, sq_norm

Fit = Literal["lsq", "pca", "endpoint"]
FITS: tuple[Fit, ...] = get_args(Fit)


@dataclass
class TensorFit:
    drift: torch.Tensor  # float32, the tensor's shape: the fitted drift D at t_ref
    r2: float | None  # pooled linearity R², None when undefined
    delta_sq_norms: list[float]  # ‖D_i‖² per checkpoint (float64 sums)
    drift_sq_norm: float  # ‖D‖², from the sums the fit already has where it can


class LineAccumulator:
    """Accumulate the deltas of one tensor, checkpoint by checkpoint, then fit the drift.

    Memory: one float32 buffer of the tensor's size (``Σ t_i D_i``, kept as ``Σ (t_i / t_1) D_i``), a second
    (``Σ D_i``) when R² is defined (two or more checkpoints), and all deltas for ``pca`` (the Gram trick needs
    every pair). The accumulator takes ownership of the deltas it is given and may update them in place.
    Norms and dot products are exact sums of short float32 runs (:mod:`driftmerge.core.sums`).
    """

    def __init__(self, t: Sequence[float], fit: str = "lsq"):
        if fit not in FITS:
            raise ValueError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
        if any(ti <= 0 for ti in t):
            raise ValueError("relative steps must be positive")
        self.t = [float(x) for x in t]
        self.fit = fit
        self._sum_td: torch.Tensor | None = None  # Σ (t_i / t_1) D_i, float32
        self._sum_d: torch.Tensor | None = None  # Σ D_i, float32 (only when R² is defined)
        self._sum_sq = 0.0  # Σ ‖D_i‖²
        self._sq: list[float] = []
        self._kept: list[torch.Tensor] = []  # deltas kept for pca / endpoint

    def add(self, delta: torch.Tensor) -> float:
        """Add the next checkpoint's delta ``D_i`` (float32), in step order; the accumulator owns it now.

        Returns ``‖D_i‖²`` (NaN or Inf when the delta holds such values).
        """
        i = len(self._sq)
        if i >= len(self.t):
            raise ValueError("more deltas than steps")
        if self.fit == "pca":
            self._kept.append(delta)
        elif self.fit == "endpoint":
            self._kept = [delta]
        if self._sum_td is None:
            self._sum_td = delta.clone() if self.fit != "lsq" else delta  # (t_1 / t_1) D_1, no pass
            if len(self.t) > 1:
                self._sum_d = delta.clone()
        else:
            self._sum_td.add_(delta, alpha=self.t[i] / self.t[0])
            if self._sum_d is not None:  # None with a single step: no intercept to fit
                self._sum_d.add_(delta)
        sq = sq_norm(delta)
        self._sq.append(sq)
        self._sum_sq += sq
        return sq

    def finish(self) -> TensorFit:
        if len(self._sq) != len(self.t):
            raise ValueError(f"got {len(self._sq)} deltas for {len(self.t)} steps")
        assert self._sum_td is not None
        r2, td_sq = self._r2()  # before the lsq drift below rescales Σ (t_i / t_1) D_i in place
        t_ref = self.t[-1]
        if self.fit == "lsq":
            factor = self.t[0] * t_ref / sum(x * x for x in self.t)  # D = t_ref Σ t_i D_i / Σ t_i²
            drift = self._sum_td if factor == 1.0 else self._sum_td.mul_(factor)
            drift_sq = self._sq[0] if len(self.t) == 1 else factor * factor * td_sq
        elif self.fit == "endpoint":
            drift, drift_sq = self._kept[0], self._sq[-1]
        else:
            drift = pca_drift(torch.stack(self._kept), self.t)
            drift_sq = sq_norm(drift)
        return TensorFit(drift=drift, r2=r2, delta_sq_norms=list(self._sq), drift_sq_norm=drift_sq)

    def _r2(self) -> tuple[float | None, float]:
        """Pooled R² and ‖Σ (t_i / t_1) D_i‖² (0.0 with one checkpoint: neither is needed then)."""
        if self._sum_d is None or self._sum_td is None:  # one checkpoint: two points
            return None, 0.0
        # two norms and a dot product, no temporaries of the tensor's size; Σ t_i D_i = t_1 · _sum_td
        td, d = self._sum_td.reshape(-1), self._sum_d.reshape(-1)
        t1 = self.t[0]
        td_sq = sq_norm(td)
        sums = pooled_sums(
            self.t,
            sum_sq_norms=self._sum_sq,
            sq_norm_sum=sq_norm(d),
            sq_norm_tsum=t1 * t1 * td_sq,
            dot_tsum_sum=t1 * dot(td, d),
        )
        return pooled_r2(*sums), td_sq


def pooled_sums(
    t: Sequence[float], *, sum_sq_norms: float, sq_norm_sum: float, sq_norm_tsum: float, dot_tsum_sum: float
) -> tuple[float, float]:
    """``(Σ_e SS_tot,e, Σ_e SS_res,e)`` of the per-element least-squares lines with intercept through the base
    ``(0, 0)`` and the checkpoints ``(t_i, D_i)``, n = N + 1 points, from running sums over the checkpoints:
    ``sum_sq_norms = Σ ‖D_i‖²``, ``sq_norm_sum = ‖Σ D_i‖²``, ``sq_norm_tsum = ‖Σ t_i D_i‖²``,
    ``dot_tsum_sum = ⟨Σ t_i D_i, Σ D_i⟩`` (with the Gram matrix G: tr G, 1ᵀG1, tᵀGt, tᵀG1).

    ``SS_tot = Σ ‖D_i‖² - ‖Σ D_i‖² / n``; ``Σ_e S_ty,e² = ‖Σ t_i D_i‖² - 2 t̄ ⟨Σ t_i D_i, Σ D_i⟩ + t̄² ‖Σ D_i‖²``;
    ``SS_res = SS_tot - Σ_e S_ty,e² / S_tt`` with ``S_tt = Σ t_i² - n t̄²`` (both clamped at 0 against rounding).
    Sums of these over tensors pool a group; ``(0, 0)`` with fewer than 3 points.
    """
    n = len(t) + 1  # the base is a point (t = 0, y = 0)
    if n < 3:
        return 0.0, 0.0
    t_bar = sum(float(x) for x in t) / n
    s_tt = sum(float(x) * float(x) for x in t) - n * t_bar * t_bar
    ss_tot = sum_sq_norms - sq_norm_sum / n
    s_ty_sq = sq_norm_tsum - 2 * t_bar * dot_tsum_sum + t_bar * t_bar * sq_norm_sum
    ss_res = max(ss_tot - max(s_ty_sq, 0.0) / s_tt, 0.0)
    return max(ss_tot, 0.0), ss_res


def pooled_r2(ss_tot: float, ss_res: float) -> float | None:
    """``R² = 1 - Σ SS_res / Σ SS_tot`` (:func:`pooled_sums`); None when nothing moves (or fewer than 3 points)."""
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else None


def pca_drift(deltas: torch.Tensor, t: Sequence[float]) -> torch.Tensor:
    """RELEX rank-1 drift from stacked deltas ``(N, *shape)`` at relative steps ``t``: ``c(t_ref) · v``."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1).double()  # (N, d)
    _, vecs = torch.linalg.eigh(flat @ flat.T)  # Gram matrix (N, N)
    u = vecs[:, -1]  # (N,) top eigenvector of D Dᵀ
    v = u @ flat  # (d,) ∝ top right singular vector
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        return torch.zeros_like(deltas[0])
    v = v / norm
    c = flat @ v  # (N,) coefficients c_i = D_i · v
    ts = torch.tensor([0.0, *t], dtype=torch.float64)
    cs = torch.cat([torch.zeros(1, dtype=torch.float64), c])
    t_bar, c_bar = ts.mean(), cs.mean()
    a = ((ts - t_bar) * (cs - c_bar)).sum() / ((ts - t_bar) ** 2).sum()
    b = c_bar - a * t_bar
    c_ref = a * t[-1] + b
    return (c_ref * v).to(deltas.dtype).reshape(deltas.shape[1:])
