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

from driftmerge.core.sums import sq_norm

SVD_METHODS = ("randomized", "exact")
ITER_TOL = 1e-5  # power iterations go on while a tracked σ_j² still moves by more than this share of ‖M‖_F²
MAX_EXTRA_ITERS = 10  # power iterations beyond the minimum, at most
SHARE_TOL = 1e-6  # an energy share within this of the rule counts as reached (float32 round-off)
ZERO_SHARE = 1e-12  # singular directions holding less than this share of ‖M‖_F² are round-off
QT_BLOCKS = 4  # row blocks of one CPU matrix in the Qᵀ M product (see _qt_m)


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


def _gram_eig(small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values ``(b, k)`` (descending, float64, clamped at 0) and left singular vectors
    ``(b, k, k)`` of a batch of sketches ``S = Qᵀ M`` ``(b, k, n)``, from the eigenvectors of ``S Sᵀ`` in float64
    (a k × k problem: cheaper than an SVD of the k × n sketch, and exact to float64 round-off)."""
    s64 = small.double()
    lam, u = torch.linalg.eigh(s64 @ s64.transpose(1, 2))  # (b, k), (b, k, k), ascending
    return lam.flip(-1).clamp_min(0), u.flip(-1)


def _small_svd(
    small: torch.Tensor, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (b, k, k)``, ``σ (b, k)``, ``Vh (b, k, n)`` (float32) of sketches ``S`` ``(b, k, n)``:
    ``S Sᵀ = U Σ² Uᵀ`` and ``Vh = Σ⁻¹ Uᵀ S`` (a row of σ = 0 stays 0); ``eig``: :func:`_gram_eig` of ``S`` when
    already computed."""
    sq, u = eig if eig is not None else _gram_eig(small)
    sigma = sq.sqrt()  # (b, k)
    vh = (u.transpose(1, 2) @ small.double()) / torch.where(sigma > 0, sigma, 1.0)[..., None]  # (b, k, n)
    return u.float(), sigma.float(), vh.float()


def _m_x(mats: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``M X`` for ``mats (b, m, n)`` and ``xt (b, k, n)`` (``Xᵀ``, k-major) → ``(b, m, k)``; a batch of one runs as
    ``torch.mm`` with a transposed right operand, the CPU BLAS's fastest layout for a skinny product (2× the
    ``Xᵀ Mᵀ`` form on 2 AVX2 cores, bench/RESULTS.md)."""
    if mats.shape[0] == 1:
        return torch.mm(mats[0], xt[0].contiguous().T)[None]  # (m, n) @ (n, k) stored k-major
    return mats @ xt.transpose(1, 2)


def _qt_m(qt: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """``Qᵀ M`` for ``qt (b, k, m)``, ``mats (b, m, n)`` → ``(b, k, n)``.

    A batch of one runs as the sum of ``QT_BLOCKS`` row blocks' products ``Q_pᵀ M_p`` (one ``bmm``): CPU BLAS is
    ~1.6× faster at that than at one long-reduction ``mm`` for a skinny ``Q`` on 2 threads, and even on one. The
    blocks depend on ``m`` alone, never on the thread count, so a matrix's result is the same in extract's
    single-threaded workers and in a training process (the re-grounding callback) and never depends on its batch.
    """
    b, m, n = mats.shape
    if b > 1:
        return qt @ mats
    p = next((p for p in (QT_BLOCKS, 2) if m % p == 0), 1)
    if p == 1:
        return torch.mm(qt[0], mats[0])[None]
    k = qt.shape[1]
    q_blocks = qt[0].reshape(k, p, m // p).transpose(0, 1).contiguous()  # (p, k, m/p)
    return torch.bmm(q_blocks, mats[0].reshape(p, m // p, n)).sum(0)[None]  # (1, k, n)


def still_rising(halves: Sequence[torch.Tensor]) -> torch.Tensor:
    """How far the estimates ``(b, t)`` of the top squared singular values may still rise, per matrix ``(b,)``,
    from three successive half-steps ``halves = (e0, e1, e2)``: ``Qᵀ M``, ``M Z``, the next ``Qᵀ M``.

    The smaller of the last full step ``|e2 - e0|`` and the rest of a geometric approach to the limit,
    ``d2 ρ / (1 - ρ)`` with ``d1 = |e1 - e0|``, ``d2 = |e2 - e1|``, ``ρ = d2 / d1`` (infinite unless ``ρ < 1``):
    subspace iteration closes the gap to each singular value by a constant factor per half-step once the
    start-up transient is past, so a first jump of 8 % of ``‖M‖²`` followed by one of 7e-5 leaves about 7e-8.
    """
    e0, e1, e2 = halves
    d1, d2 = (e1 - e0).abs(), (e2 - e1).abs()
    rho = d2 / d1.clamp_min(torch.finfo(d1.dtype).tiny)
    geometric = torch.where(rho < 1, d2 * rho / (1 - rho).clamp_min(torch.finfo(d1.dtype).eps), torch.inf)
    return torch.minimum((e2 - e0).abs(), geometric).amax(dim=1)


def randomized_svd(
    mats: torch.Tensor,
    k: int,
    *,
    seeds: Sequence[int],
    niter: int = 1,
    compute_dtype: torch.dtype | None = None,
    track: int | None = None,
    totals: torch.Tensor | None = None,
    tol: float = ITER_TOL,
    max_extra: int = MAX_EXTRA_ITERS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Top-k singular triplets of each matrix of a batch ``(b, m, n)`` by randomized subspace iteration.

    ``Q = orth(M Ω)``, then power iterations ``Q = orth(M Z)`` with ``Z = orth((Qᵀ M)ᵀ)`` (Halko, Martinsson &
    Tropp 2011, Alg. 4.4), then the SVD of the small ``Qᵀ M``. Each half-step gives estimates of the top squared
    singular values that rise towards the true ones: those of ``Qᵀ M`` and of ``M Z`` (both are lower bounds).
    After ``niter`` power iterations a matrix stops as soon as its first ``track`` estimates may rise by at most
    ``tol · ‖M‖_F²`` more (:func:`still_rising`; ``totals`` holds ``‖M‖_F²``, computed when not given), and in any
    case after ``niter + max_extra``. A matrix with a clear gap (an RLVR drift) stops at ``niter`` — four
    passes over ``M`` at ``niter = 1`` — and a flat spectrum takes more iterations instead of a worse answer.
    Converged matrices are frozen, so each matrix's result is the same whatever its batch holds.

    Both products read ``M`` in its stored row-major layout (``Qᵀ M`` and ``M X`` with ``X`` k-major).
    The sketching products run in ``compute_dtype`` (default ``mats.dtype``; half types accumulate in float32);
    every product whose estimates are compared or reported runs in ``mats.dtype``.
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
        totals = torch.tensor([sq_norm(x) for x in mats], dtype=torch.float64, device=mats.device)  # (b,) ‖M‖_F²
    q = _orth(_m_x(low, omega_t.to(mats.device, dt)))  # (b, m, k) M Ω
    active = torch.ones(b, dtype=torch.bool, device=mats.device)
    iters = torch.zeros(b, dtype=torch.int64, device=mats.device)
    prev: torch.Tensor | None = None  # estimates of the last Qᵀ M
    half: torch.Tensor | None = None  # estimates of the M Z after it
    best: torch.Tensor | None = None
    best_eig: tuple[torch.Tensor, torch.Tensor] | None = None
    for it in range(niter + max_extra + 1):
        full = it >= niter - 1  # from here on the estimates are compared or reported: the input's precision
        small = _qt_m(q.transpose(1, 2).to(mats.dtype if full else dt), mats if full else low)  # (b, k, n) Qᵀ M
        if full:
            eig = _gram_eig(small)
            sq = eig[0][:, :track]  # (b, track) squared Ritz values, float64
            if it >= niter:
                keep = active[:, None, None]
                best = small if best is None else torch.where(keep, small, best)
                best_eig = (
                    eig
                    if best_eig is None
                    else (torch.where(keep[..., 0], eig[0], best_eig[0]), torch.where(keep, eig[1], best_eig[1]))
                )
                if prev is not None and half is not None:
                    active &= still_rising((prev, half, sq)) > tol * totals
                if it == niter + max_extra or not bool(active.any()):
                    break
            prev = sq
        iters += active
        z = _orth(small.transpose(1, 2))  # (b, n, k)
        y = _m_x(mats if full else low, z.transpose(1, 2).to(mats.dtype if full else dt))  # (b, m, k) M Z
        if full:
            half = _gram_eig(y.transpose(1, 2))[0][:, :track]  # (b, track) squared singular values of M Z
        q = torch.where(active[:, None, None], _orth(y), q)
    del low
    assert best is not None
    u_small, s, vh = _small_svd(best, best_eig)  # (b,k,k), (b,k), (b,k,n)
    return q @ u_small, s, vh, iters.tolist()


def factorize(
    mats: Sequence[torch.Tensor],
    rule: int | float,
    *,
    seeds: Sequence[int],
    method: str = "randomized",
    niter: int = 1,
    oversample: int = 8,
    compute_dtype: torch.dtype = torch.float32,
    sq_norms: Sequence[float] | None = None,
) -> list[Factor]:
    """Factorize same-shape matrices ``(m, n)`` (float32, any device; a list or a ``(b, m, n)`` batch).

    Returns one :class:`Factor` per matrix (factors on CPU, float32). A matrix with no drift gets rank 0 (the
    caller leaves it out). The energy is measured against ``‖M‖_F²`` of the float32 input: ``sq_norms`` when the
    caller knows them (:func:`driftmerge.core.sums.sq_norm` of each matrix), else computed so.

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
    totals = list(sq_norms) if sq_norms is not None else [sq_norm(m) for m in mats]
    if mats[0].device.type == "cpu":
        return [
            _factorize_batch(m[None], rule, [s], [t], method, niter, oversample, compute_dtype)[0]
            for m, s, t in zip(mats, seeds, totals, strict=True)
        ]
    batch = mats if isinstance(mats, torch.Tensor) else torch.stack(list(mats))  # (b, m, n)
    return _factorize_batch(batch, rule, seeds, totals, method, niter, oversample, compute_dtype)


def _factorize_batch(
    mats: torch.Tensor,
    rule: int | float,
    seeds: Sequence[int],
    totals: list[float],
    method: str,
    niter: int,
    oversample: int,
    compute_dtype: torch.dtype,
) -> list[Factor]:
    b, m, n = mats.shape
    full = min(m, n)
    norms_sq = torch.tensor(totals, dtype=torch.float64, device=mats.device)  # (b,) ‖M‖_F²
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
