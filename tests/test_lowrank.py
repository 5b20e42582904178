"""Low-rank factorization: randomized vs exact, rank rules, batching independence."""

from __future__ import annotations

import pytest
import torch

from driftmerge.core.lowrank import factorize, matrix_seed, select_rank, still_rising
from driftmerge.core.sums import sq_norm


def real_looking(m: int, n: int, seed: int, rank: int = 1, noise: float = 0.1) -> torch.Tensor:
    """A dominant low-rank drift plus dense noise, like an RLVR update."""
    g = torch.Generator().manual_seed(seed)
    low = sum(
        (2.0**-i) * torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g) for i in range(rank)
    )  # (m, n)
    return low + noise * torch.randn(m, n, generator=g)


def with_spectrum(m: int, n: int, sv: list[float], seed: int) -> torch.Tensor:
    """A matrix ``(m, n)`` with singular values ``sv`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sv), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(sv), generator=g))
    return (u * torch.tensor(sv)) @ v.T


def top_cos(f, u1: torch.Tensor) -> float:
    """|cos| between the top left singular vector of the factor product and ``u1``."""
    q, _ = torch.linalg.qr(f.B)  # (m, r): B's columns span the product's column space
    top = q @ torch.linalg.svd(q.T @ (f.B @ f.A))[0][:, 0]
    return abs(float(top @ u1))


SPECTRA = {
    "planted": lambda s: real_looking(300, 200, s, rank=6, noise=0.01),  # dominant rank-1 + decaying + noise
    "nearly flat": lambda s: with_spectrum(300, 200, [0.97**i for i in range(120)], s),  # σ1/σ2 = 1.03
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 4])
def test_randomized_agrees_with_exact(spectrum, dtype, rank):
    for seed in range(3):
        m = SPECTRA[spectrum](seed)
        u, _, _ = torch.linalg.svd(m)
        rnd = factorize([m], rank, seeds=[seed], method="randomized", compute_dtype=dtype)[0]
        ex = factorize([m], rank, seeds=[seed], method="exact")[0]
        assert rnd.rank == ex.rank == rank
        assert abs(rnd.energy - ex.energy) < 1e-3
        assert top_cos(rnd, u[:, 0]) >= 0.999
        assert rnd.B.shape == (300, rank) and rnd.A.shape == (rank, 200)
        best = ex.B @ ex.A  # the exact factors are the truncated SVD
        s = torch.linalg.svdvals(m)
        assert abs(float(best.norm() ** 2) - float((s[:rank] ** 2).sum())) < 1e-4 * float(s[0] ** 2)


def test_flat_spectrum_iterates_longer_and_keeps_the_energy():
    # white noise: the top direction is barely separated (its |cos| is not a stable quantity), but the energy of
    # the best rank-r approximation is, and the power iterations go on until it settles
    for seed in range(3):
        m = torch.randn(300, 200, generator=torch.Generator().manual_seed(seed))
        for rank in (1, 4):
            rnd = factorize([m], rank, seeds=[seed])[0]
            ex = factorize([m], rank, seeds=[seed], method="exact")[0]
            assert abs(rnd.energy - ex.energy) < 1e-3
            assert rnd.iterations > 1  # more than the minimum
    planted = factorize([real_looking(300, 200, 0, noise=0.01)], 1, seeds=[0])[0]
    assert planted.iterations == 1  # a clear gap stops at the minimum


def test_stopping_rule_predicts_the_remaining_rise():
    # half-steps closing the gap to the limit 1.0 by a factor 1e-3 each: after 0.9 → 0.9999 → 0.9999999 the
    # predicted rest is the true gap, 1e-7, though the last step alone moved by 1e-4
    e0, e1, e2 = (torch.tensor([[x]], dtype=torch.float64) for x in (0.9, 0.9999, 0.9999999))
    assert float(still_rising((e0, e1, e2))[0]) == pytest.approx(1e-7, rel=1e-3)
    # no contraction (ρ ≥ 1) falls back on the full step; two zero steps have converged
    e0, e1, e2 = (torch.tensor([[x]], dtype=torch.float64) for x in (0.5, 0.6, 0.7))
    assert float(still_rising((e0, e1, e2))[0]) == pytest.approx(0.2)
    same = torch.tensor([[0.25, 0.1]], dtype=torch.float64)
    assert float(still_rising((same, same, same))[0]) == 0.0
    # the slowest of the tracked values decides
    e0, e1, e2 = (torch.tensor([[0.9, x]], dtype=torch.float64) for x in (0.5, 0.6, 0.7))
    assert float(still_rising((e0, e1, e2))[0]) == pytest.approx(0.2)


def test_one_power_iteration_matches_the_exact_svd_on_a_clear_gap():
    # the bench's shape of drift: 60 % of the energy on one direction, the rest dense noise
    g = torch.Generator().manual_seed(3)
    m = torch.randn(512, 1, generator=g) @ torch.randn(1, 384, generator=g)
    m = m / m.norm() * 0.6**0.5 + torch.randn(512, 384, generator=g) / (512 * 384) ** 0.5 * 0.4**0.5
    rnd = factorize([m], 1, seeds=[0])[0]
    ex = factorize([m], 1, seeds=[0], method="exact")[0]
    p, q = (rnd.B @ rnd.A).flatten().double(), (ex.B @ ex.A).flatten().double()
    assert rnd.iterations == 1
    assert abs(float(p @ q / (p.norm() * q.norm()))) > 0.99999
    assert abs(rnd.energy - ex.energy) < 1e-6


def test_result_does_not_depend_on_batch():
    mats = [real_looking(48, 40, s) for s in range(4)]
    seeds = [matrix_seed(7, f"t{i}") for i in range(4)]
    together = factorize(torch.stack(mats), 2, seeds=seeds)
    pairs = factorize(mats[:2], 2, seeds=seeds[:2]) + factorize(mats[2:], 2, seeds=seeds[2:])
    for i in range(4):
        alone = factorize([mats[i]], 2, seeds=seeds[i : i + 1])[0]
        for other in (together[i], pairs[i]):  # byte for byte on the CPU
            assert torch.equal(alone.A, other.A) and torch.equal(alone.B, other.B)
            assert alone.energy == other.energy


def test_same_seed_same_bytes_other_seed_same_answer():
    m = real_looking(120, 90, 3)
    a, b = factorize([m], 1, seeds=[5])[0], factorize([m], 1, seeds=[5])[0]
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    c = factorize([m], 1, seeds=[6])[0]
    assert torch.allclose(a.B @ a.A, c.B @ c.A, atol=1e-5 * float(m.abs().max()))


def test_energy_share_rule_picks_smallest_rank():
    # singular values 4, 2, 1, 0.5: energy shares 16/21.25, 20/21.25, 21/21.25, 1
    u, _ = torch.linalg.qr(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)))
    m = (u * torch.tensor([4.0, 2.0, 1.0, 0.5])) @ v.T  # (40, 30), rank 4
    for rule, want in [(0.5, 1), (0.8, 2), (0.95, 3), (0.99, 4), (1.0, 4)]:
        for method in ("randomized", "exact"):
            f = factorize(m[None], rule, seeds=[3], method=method)[0]
            assert f.rank == want, (rule, method)
            assert f.energy >= rule - 1e-6


def test_energy_rule_widens_the_sketch_when_needed():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(80, 70, generator=g)  # flat spectrum: 0.9 of the energy needs many directions
    rnd = factorize(m[None], 0.9, seeds=[1], method="randomized")[0]
    ex = factorize(m[None], 0.9, seeds=[1], method="exact")[0]
    assert rnd.rank == ex.rank > 16
    assert rnd.energy >= 0.9


def test_select_rank_caps_and_zero():
    sq = torch.tensor([4.0, 1.0, 0.0])
    assert select_rank(sq, 5.0, rule=8) == 2
    assert select_rank(torch.zeros(3), 0.0, rule=0.9) == 0
    zero = factorize(torch.zeros(1, 5, 4), 1, seeds=[0], method="exact")[0]
    assert zero.rank == 0


def test_bfloat16_compute_keeps_energy():
    m = real_looking(128, 96, 5)[None]
    f32 = factorize(m, 1, seeds=[9], method="randomized")[0]
    bf16 = factorize(m, 1, seeds=[9], method="randomized", compute_dtype=torch.bfloat16)[0]
    assert abs(f32.energy - bf16.energy) < 1e-2


def test_batched_path_freezes_each_matrix_at_its_own_iteration():
    # the path CUDA takes (one batch, converged matrices frozen), exercised on the CPU
    from driftmerge.core.lowrank import _factorize_batch

    planted = real_looking(300, 200, 0, noise=0.01)
    flat = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    totals = [sq_norm(planted), sq_norm(flat)]
    batch = _factorize_batch(torch.stack([planted, flat]), 1, [11, 12], totals, "randomized", 1, 8, torch.float32)
    alone = [factorize([m], 1, seeds=[s])[0] for m, s in ((planted, 11), (flat, 12))]
    assert [f.iterations for f in batch] == [f.iterations for f in alone]
    assert batch[0].iterations == 1 and batch[1].iterations > 1
    for b, a in zip(batch, alone, strict=True):
        assert abs(b.energy - a.energy) < 1e-6
    # batched and single products round differently; on the planted matrix the top direction is well defined, so
    # the two rank-1 products agree closely (on white noise it is not, and only the energy is comparable)
    torch.testing.assert_close(batch[0].B @ batch[0].A, alone[0].B @ alone[0].A, rtol=1e-4, atol=1e-6)


def test_factorizer_batched_and_per_matrix_paths_agree():
    # the GPU's path (same-shape groups within the budget) run on the CPU against the CPU's (each matrix as it
    # comes, on two workers): the same factors, and the groups hold what the budget allows
    from types import SimpleNamespace

    from driftmerge.core.factorizer import GroupFactorizer

    opts = SimpleNamespace(rank=1, seed=0, svd="randomized", niter=1, oversample=8)
    mats = {f"a{i}": real_looking(40, 24, i) for i in range(5)}
    mats |= {f"b{i}": real_looking(24, 40, 9 + i) for i in range(3)}
    mats["c"] = real_looking(30, 20, 20)
    per_matrix = GroupFactorizer(opts, torch.float32, 1 << 30, workers=2)
    grouped = GroupFactorizer(opts, torch.float32, 1 << 30, batched=True)
    small_budget = GroupFactorizer(opts, torch.float32, 2 * 40 * 24 * 4, batched=True)  # two matrices' bytes
    for name, m in mats.items():
        for f in (per_matrix, grouped, small_budget):
            f.add(name, m, transposed=name == "c")
    results = [f.finish() for f in (per_matrix, grouped, small_budget)]
    assert (per_matrix.batches, grouped.batches) == (len(mats), 3)  # one per matrix; one per shape
    assert 3 < small_budget.batches < len(mats)
    for name in mats:
        for other in results[1:]:
            assert torch.equal(results[0][name].B, other[name].B) and torch.equal(results[0][name].A, other[name].A)
    assert results[0]["c"].B.shape == (20, 1)  # transposed: the factors of the matrix's transpose
