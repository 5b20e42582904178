"""Low-rank factorization: randomized vs exact, rank rules, batching independence."""

from __future__ import annotations

import pytest
import torch

from driftmerge.lowrank import factorize, matrix_seed, select_rank


def real_looking(m: int, n: int, seed: int, rank: int = 1, noise: float = 0.1) -> torch.Tensor:
    """A dominant low-rank drift plus dense noise, like an RLVR update."""
    g = torch.Generator().manual_seed(seed)
    low = sum(
        (2.0**-i) * torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g) for i in range(rank)
    )  # (m, n)
    return low + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("rank", [1, 4])
def test_randomized_agrees_with_exact_on_energy_and_product(rank):
    # the kept directions stand clear of the noise, as the dominant directions of an RLVR update do
    mats = torch.stack([real_looking(96, 64, s, rank=rank + 2, noise=0.02) for s in range(3)])  # (3, 96, 64)
    seeds = [matrix_seed(0, f"m{i}") for i in range(3)]
    rnd = factorize(mats, rank, seeds, "randomized")
    ex = factorize(mats, rank, seeds, "exact")
    for r, e, m in zip(rnd, ex, mats, strict=True):
        assert r.rank == e.rank == rank
        assert abs(r.energy - e.energy) < 1e-3
        best = e.B @ e.A  # the best rank-r approximation
        assert torch.linalg.norm(r.B @ r.A - best) / torch.linalg.norm(best) < 1e-2
        assert r.B.shape == (96, rank) and r.A.shape == (rank, 64)
        u, s, vh = torch.linalg.svd(m)
        assert torch.allclose(best, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-4)


def test_result_does_not_depend_on_batch():
    mats = [real_looking(48, 40, s) for s in range(4)]
    seeds = [matrix_seed(7, f"t{i}") for i in range(4)]
    together = factorize(torch.stack(mats), 2, seeds)
    for i in range(4):
        alone = factorize(mats[i][None], 2, seeds[i : i + 1])[0]
        assert torch.allclose(alone.B @ alone.A, together[i].B @ together[i].A, atol=1e-5)


def test_energy_share_rule_picks_smallest_rank():
    # singular values 4, 2, 1, 0.5: energy shares 16/21.25, 20/21.25, 21/21.25, 1
    u, _ = torch.linalg.qr(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)))
    m = (u * torch.tensor([4.0, 2.0, 1.0, 0.5])) @ v.T  # (40, 30), rank 4
    for rule, want in [(0.5, 1), (0.8, 2), (0.95, 3), (0.99, 4), (1.0, 4)]:
        for method in ("randomized", "exact"):
            f = factorize(m[None], rule, [3], method)[0]
            assert f.rank == want, (rule, method)
            assert f.energy >= rule - 1e-6


def test_energy_rule_widens_the_sketch_when_needed():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(80, 70, generator=g)  # flat spectrum: 0.9 of the energy needs many directions
    rnd = factorize(m[None], 0.9, [1], "randomized")[0]
    ex = factorize(m[None], 0.9, [1], "exact")[0]
    assert rnd.rank == ex.rank > 16
    assert rnd.energy >= 0.9


def test_select_rank_caps_and_zero():
    sq = torch.tensor([4.0, 1.0, 0.0])
    assert select_rank(sq, 5.0, 8) == 2
    assert select_rank(torch.zeros(3), 0.0, 0.9) == 0
    zero = factorize(torch.zeros(1, 5, 4), 1, [0], "exact")[0]
    assert zero.rank == 0


def test_bfloat16_compute_keeps_energy():
    m = real_looking(128, 96, 5)[None]
    f32 = factorize(m, 1, [9], "randomized")[0]
    bf16 = factorize(m, 1, [9], "randomized", compute_dtype=torch.bfloat16)[0]
    assert abs(f32.energy - bf16.energy) < 1e-2
