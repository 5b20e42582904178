"""The drift line of low-rank updates, without forming a dense matrix (pure math, no I/O).

A run trained with LoRA moves a weight by ``Δ_i = B_i A_i`` at checkpoint i (PEFT's scaling folded into
``B_i`` ``(m, r_i)``; ``A_i`` ``(r_i, n)``). Every fit of :mod:`driftmerge.core.trajectory` is a combination
``D = Σ_i w_i Δ_i`` whose weights depend on the deltas only through their Gram matrix ``K_ij = ⟨Δ_i, Δ_j⟩``:

- ``lsq``: ``w_i = t_ref t_i / Σ t²``; ``endpoint``: ``w = e_N``;
- ``pca``: ``u`` the top eigenvector of K, ``v = Σ u_i Δ_i / √(uᵀKu)``, ``c = K u / √(uᵀKu)``, the least-squares
  line through ``(0, 0)`` and ``(t_i, c_i)`` read at ``t_ref``: ``w = c(t_ref) u / √(uᵀKu)``.

So ``D = U V`` with ``U = [w_1 B_1 … w_N B_N]`` ``(m, R)`` and ``V = [A_1; …; A_N]`` ``(R, n)``, ``R = Σ r_i``,
and ``K_ij = Σ (B_iᵀB_j) ∘ (A_i A_jᵀ)`` from the two ``(R, R)`` Gram matrices. The pooled R² takes
``tr K, 1ᵀK1, tᵀKt, tᵀK1`` (:func:`driftmerge.core.trajectory.pooled_sums`), and ``‖D‖² = wᵀKw``. The SVD of
``D`` is exact from QR factors of ``U`` and ``Vᵀ`` and the SVD of the ``(R, R)`` core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from driftmerge.core.lowrank import Factor, select_rank
from driftmerge.core.trajectory import pooled_r2, pooled_sums


@dataclass
class FactoredFit:
    U: torch.Tensor  # (m, R) float32: the drift is U V
    V: torch.Tensor  # (R, n) float32
    r2: float | None  # pooled linearity R², as for dense deltas
    delta_sq_norms: list[float]  # ‖Δ_i‖² per checkpoint
    drift_sq_norm: float  # ‖D‖²


def fit_factored(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], *, t: Sequence[float], fit: str
) -> FactoredFit:
    """The drift ``D = U V`` of the updates ``Δ_i = bs[i] @ as_[i]`` at relative steps ``t`` (module docstring)."""
    n = len(t)
    if len(bs) != n or len(as_) != n:
        raise ValueError(f"got {len(bs)} and {len(as_)} factors for {n} steps")
    b = torch.cat([x.double() for x in bs], dim=1)  # (m, R)
    a = torch.cat([x.double() for x in as_], dim=0)  # (R, n)
    cuts = [0]
    for x in bs:
        cuts.append(cuts[-1] + x.shape[1])
    prod = (b.T @ b) * (a @ a.T)  # (R, R): entry (p, q) = (B_pᵀB_q)(A_p A_qᵀ) summed per block below
    gram = torch.stack(
        [torch.stack([prod[cuts[i] : cuts[i + 1], cuts[j] : cuts[j + 1]].sum() for j in range(n)]) for i in range(n)]
    )  # (N, N) K_ij = ⟨Δ_i, Δ_j⟩
    w = _weights(gram, t, fit)  # (N,)
    ts, ones = torch.tensor([float(x) for x in t], dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    sums = pooled_sums(
        t,
        sum_sq_norms=float(gram.trace()),
        sq_norm_sum=float(ones @ gram @ ones),
        sq_norm_tsum=float(ts @ gram @ ts),
        dot_tsum_sum=float(ts @ gram @ ones),
    )
    scale = torch.cat([w[i].expand(cuts[i + 1] - cuts[i]) for i in range(n)])  # (R,)
    return FactoredFit(
        U=(b * scale).float(),
        V=a.float(),
        r2=pooled_r2(*sums),
        delta_sq_norms=[float(x) for x in gram.diagonal()],
        drift_sq_norm=max(float(w @ gram @ w), 0.0),
    )


def _weights(gram: torch.Tensor, t: Sequence[float], fit: str) -> torch.Tensor:
    """``w`` with ``D = Σ w_i Δ_i`` for ``fit`` (module docstring), float64."""
    n, t_ref = gram.shape[0], float(t[-1])
    if fit == "lsq":
        tt = sum(float(x) ** 2 for x in t)
        return torch.tensor([t_ref * float(x) / tt for x in t], dtype=torch.float64)
    if fit == "endpoint":
        return torch.nn.functional.one_hot(torch.tensor(n - 1), n).double()
    if fit != "pca":
        raise ValueError(f"unknown fit {fit!r}")
    _, vecs = torch.linalg.eigh(gram)
    u = vecs[:, -1]  # (N,)
    norm_sq = float(u @ gram @ u)
    if norm_sq <= 0:
        return torch.zeros(n, dtype=torch.float64)
    c = (gram @ u) / norm_sq**0.5  # (N,) c_i = Δ_i · v
    ts = torch.tensor([0.0, *[float(x) for x in t]], dtype=torch.float64)
    cs = torch.cat([torch.zeros(1, dtype=torch.float64), c])
    t_bar, c_bar = ts.mean(), cs.mean()
    slope = ((ts - t_bar) * (cs - c_bar)).sum() / ((ts - t_bar) ** 2).sum()
    c_ref = slope * t_ref + (c_bar - slope * t_bar)
    return c_ref * u / norm_sq**0.5


def factor_product(u: torch.Tensor, v: torch.Tensor, *, rule: int | float) -> Factor:
    """The exact rank-``rule`` factors of ``M = u v`` (``u`` ``(m, R)``, ``v`` ``(R, n)``): QR of ``u`` and ``vᵀ``,
    SVD of the ``(R, R)`` core; ``B = Q_u W √S``, ``A = √S Zᵀ Q_vᵀ``, as :func:`driftmerge.core.lowrank.factorize`
    splits them. The energy kept is ``Σ_{i<r} σ_i² / ‖M‖_F²``."""
    qu, ru = torch.linalg.qr(u.double())  # (m, R), (R, R)
    qv, rv = torch.linalg.qr(v.double().T)  # (n, R), (R, R)
    w, s, zh = torch.linalg.svd(ru @ rv.T)  # core (R, R)
    sq = s.pow(2)
    total = float(sq.sum())
    r = select_rank(sq, total, rule=rule)
    root = s[:r].sqrt()
    b = (qu @ w[:, :r]) * root  # (m, r)
    a = root[:, None] * (zh[:r] @ qv.T)  # (r, n)
    kept = float(sq[:r].sum()) / total if total > 0 else 0.0
    return Factor(B=b.float().contiguous(), A=a.float().contiguous(), energy=min(kept, 1.0))
