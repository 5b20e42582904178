"""Low-rank factorization of drift matrices, batched over same-shape matrices (pure math, no I/O).

For a drift matrix ``M ≈ U_r S_r V_rᵀ`` (top-r singular triplets) the stored factors are
``B = U_r S_r^½`` ``(m, r)`` and ``A = S_r^½ V_rᵀ`` ``(r, n)``, so ``B A`` is the best rank-r approximation.
The energy kept is ``Σ_{i<r} σ_i² / ‖M‖_F²``.

Rank rule: an ``int`` fixes r (capped at ``min(m, n)``); a ``float`` in (0, 1] picks the smallest r whose
singular values hold that share of ``‖M‖_F²``.

``randomized`` is seeded subspace iteration (Halko et al.; ``torch.svd_lowrank``-style) with oversampling and
power iterations; each matrix draws its Gaussian test matrix from its own seed, so the result of one matrix does
not depend on which others share its batch. ``exact`` runs ``torch.linalg.svd``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SVD_METHODS = ("randomized", "exact")
ITER_TOL = 1e-5  # power iterations go on while a tracked σ_j² still moves by more than this share of ‖M‖_F²
MAX_EXTRA_ITERS = 10  # power iterations beyond the minimum, at most
SHARE_TOL = 1e-6  # an energy share within this of the rule counts as reached (float32 round-off)
ZERO_SHARE = 1e-12  # singular directions holding less than this share of ‖M‖_F² are round-off


@dataclass
class Factor:
    B: torch.Tensor  # (m, r) float32 on CPU
    A: torch.Tensor  # (r, n) float32 on CPU
    energy: float  # share of ‖M‖_F² kept by B A
    iterations: int = 0  # power iterations the randomized factorization took (0 for exact)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def matrix_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one matrix, from the job's seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def select_rank(sq_sv: torch.Tensor, total: float, *, rule: int | float) -> int:
    """Rank for singular values squared ``sq_sv`` (descending) of a matrix whose ‖M‖_F² is ``total``."""
    if total <= 0:
        return 0
    nonzero = int((sq_sv > total * ZERO_SHARE).sum())  # directions above round-off
    if isinstance(rule, int):
        return min(rule, nonzero)
    share = torch.cumsum(sq_sv.double(), 0) / total  # (k,)
    reached = torch.nonzero(share >= rule - SHARE_TOL)
    return min(int(reached[0]) + 1, nonzero) if len(reached) else nonzero


def _orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a batch ``(b, m, k)``, in float32 (QR has no half kernels)."""
    q, _ = torch.linalg.qr(y.float())
    return q


def _xt_mt(xt: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Mᵀ`` for ``xt (b, k, n)``, ``mats (b, m, n)`` → ``(b, k, m)``; a batch of one runs as ``F.linear``
    (the CPU's fast kernel for this layout, in every dtype)."""
    if mats.shape[0] == 1:
        return F.linear(xt[0], mats[0])[None]
    return xt @ mats.transpose(1, 2)


def _qt_m(qt: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``Qᵀ M`` for ``qt (b, k, m)``, ``mats (b, m, n)`` → ``(b, k, n)``."""
    if mats.shape[0] == 1:
        return torch.mm(qt[0], mats[0])[None]
    return qt @ mats


def randomized_svd(
    mats: torch.Tensor,
    k: int,
    *,
    seeds: Sequence[int],
    niter: int = 2,
    compute_dtype: torch.dtype | None = None,
    track: int | None = None,
    totals: torch.Tensor | None = None,
    tol: float = ITER_TOL,
    max_extra: int = MAX_EXTRA_ITERS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Top-k singular triplets of each matrix of a batch ``(b, m, n)`` by randomized subspace iteration.

    ``Q = orth(M Ω)``, then power iterations ``Q = orth(M orth((Qᵀ M)ᵀ))`` (Halko, Martinsson & Tropp 2011,
    Alg. 4.4), then the SVD of the small ``Qᵀ M``. The singular values of each ``Qᵀ M`` (Ritz values) rise towards
    the true ones; after ``niter`` iterations a matrix stops as soon as its first ``track`` squared Ritz values
    moved by at most ``tol · ‖M‖_F²`` in one iteration (``totals`` holds ``‖M‖_F²``; computed when not given), and
    in any case after ``niter + max_extra``. A matrix with a clear gap (an RLVR drift) stops at ``niter``; a flat
    spectrum takes more iterations instead of a worse answer.
    Converged matrices are frozen, so each matrix's result is the same whatever its batch holds.

    Sketches are kept k-major (``(b, k, ·)``) so both products read ``M`` row by row, the fast layout on CPU BLAS.
    The sketching products run in ``compute_dtype`` (default ``mats.dtype``; half types accumulate in float32);
    every ``Qᵀ M`` from iteration ``niter - 1`` on — those whose singular values are compared or reported — runs in
    ``mats.dtype``.
    Returns ``U (b, m, k)``, ``S (b, k)``, ``Vh (b, k, n)`` in float32 and the iterations each matrix took.
    """
    b, _, n = mats.shape
    track = min(track or k, k)
    omega_t = torch.stack(
        [torch.randn(k, n, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # (b, k, n) Ωᵀ, drawn on CPU so every device sees the same numbers
    dt = compute_dtype or mats.dtype
    low = mats if dt == mats.dtype else mats.to(dt)
    if totals is None:
        totals = torch.linalg.vector_norm(mats.reshape(b, -1), dim=1).pow(2)  # (b,) ‖M‖_F²
    q = _orth(_xt_mt(omega_t.to(mats.device, dt), low).transpose(1, 2))  # (b, m, k) from (M Ω)ᵀ = Ωᵀ Mᵀ
    active = torch.ones(b, dtype=torch.bool, device=mats.device)
    iters = torch.zeros(b, dtype=torch.int64, device=mats.device)
    prev: torch.Tensor | None = None
    best: torch.Tensor | None = None
    for it in range(niter + max_extra + 1):
        full = it >= niter - 1  # from here on Qᵀ M is compared or reported: compute it in the input's precision
        small = _qt_m(q.transpose(1, 2).to(mats.dtype if full else dt), mats if full else low)  # (b, k, n) Qᵀ M
        sq = torch.linalg.svdvals(small.float()).pow(2)[:, :track]  # (b, track) squared Ritz values
        if it >= niter:
            best = small if best is None else torch.where(active[:, None, None], small, best)
            if prev is not None:
                active &= (sq - prev).abs().amax(dim=1) > tol * totals  # still moving
            if it == niter + max_extra or not bool(active.any()):
                break
        prev = sq
        iters += active
        z = _orth(small.transpose(1, 2))  # (b, n, k)
        q_next = _orth(_xt_mt(z.transpose(1, 2).to(dt), low).transpose(1, 2))  # (b, m, k) from (M Z)ᵀ = Zᵀ Mᵀ
        q = torch.where(active[:, None, None], q_next, q)
    del low
    assert best is not None
    u_small, s, vh = torch.linalg.svd(best.float(), full_matrices=False)  # (b,k,k), (b,k), (b,k,n)
    return q @ u_small, s, vh, iters.tolist()


def factorize(
    mats: Sequence[torch.Tensor],
    rule: int | float,
    *,
    seeds: Sequence[int],
    method: str = "randomized",
    niter: int = 2,
    oversample: int = 8,
    compute_dtype: torch.dtype = torch.float32,
) -> list[Factor]:
    """Factorize same-shape matrices ``(m, n)`` (float32, any device; a list or a ``(b, m, n)`` batch).

    Returns one :class:`Factor` per matrix (factors on CPU, float32). A matrix with no drift gets rank 0 (the
    caller leaves it out). The energy is measured against ``‖M‖_F²`` of the float32 input.

    On CUDA the matrices run as one batch. On the CPU each runs as its own batch of one: CPU BLAS picks other
    kernels for other batch sizes, and one matrix at a time keeps every result independent of the grouping
    (byte for byte) at the same speed.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown factorization method {method!r}")
    if len(mats) != len(seeds):
        raise ValueError(f"got {len(mats)} matrices for {len(seeds)} seeds")
    if not len(mats):
        return []
    if mats[0].device.type == "cpu":
        return [
            _factorize_batch(m[None], rule, [s], method, niter, oversample, compute_dtype)[0]
            for m, s in zip(mats, seeds, strict=True)
        ]
    batch = mats if isinstance(mats, torch.Tensor) else torch.stack(list(mats))  # (b, m, n)
    return _factorize_batch(batch, rule, seeds, method, niter, oversample, compute_dtype)


def _factorize_batch(
    mats: torch.Tensor,
    rule: int | float,
    seeds: Sequence[int],
    method: str,
    niter: int,
    oversample: int,
    compute_dtype: torch.dtype,
) -> list[Factor]:
    b, m, n = mats.shape
    full = min(m, n)
    norms_sq = torch.linalg.vector_norm(mats.reshape(b, -1), dim=1).pow(2)  # (b,) ‖M‖_F²
    totals = norms_sq.tolist()
    k_want = full if isinstance(rule, float) else min(rule, full)
    if isinstance(rule, float) and method == "randomized":
        k_want = min(8, full)  # grown below until the energy share is reached
    while True:
        k = k_want + oversample
        if method == "exact" or k >= full:
            u, s, vh = torch.linalg.svd(mats.float(), full_matrices=False)
            iters = [0] * b
            exact = True
        else:
            u, s, vh, iters = randomized_svd(
                mats, k, seeds=seeds, niter=niter, compute_dtype=compute_dtype, track=k_want, totals=norms_sq
            )
            u, s, vh = u[..., :k_want], s[..., :k_want], vh[..., :k_want, :]
            exact = False
        sq = s.double().pow(2)  # (b, k)
        ranks = [select_rank(sq[i], totals[i], rule=rule) for i in range(b)]
        if (
            exact
            or not isinstance(rule, float)
            or all(float(sq[i, : ranks[i]].sum()) >= (rule - SHARE_TOL) * totals[i] for i in range(b))
        ):
            break
        k_want = min(2 * k_want, full)  # the share was not reached inside the sketch: widen it
    out = []
    for i in range(b):
        r = ranks[i]
        root = s[i, :r].sqrt()  # (r,)
        B = (u[i, :, :r] * root).float().cpu()  # (m, r)
        A = (root[:, None] * vh[i, :r, :]).float().cpu()  # (r, n)
        kept = float(sq[i, :r].sum()) / totals[i] if totals[i] > 0 else 0.0
        out.append(Factor(B=B.contiguous(), A=A.contiguous(), energy=min(kept, 1.0), iterations=iters[i]))
    return out
