"""The fits of docs/design.md §2.2 against a direct dense numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driftmerge.core.trajectory import LineAccumulator, pooled_r2, pooled_sums


def _fit(deltas: np.ndarray, t: list[float], fit: str):
    acc = LineAccumulator(t, fit)
    for d in deltas:
        acc.add(torch.from_numpy(d.astype(np.float32)))
    return acc.finish()


def _dense_r2(deltas: np.ndarray, t: list[float]) -> float:
    """Per-element least-squares line with intercept over base (0, 0) and checkpoints, pooled SS."""
    ts = np.array([0.0, *t])
    ys = np.concatenate([np.zeros((1, *deltas.shape[1:])), deltas]).reshape(len(ts), -1).astype(np.float64)
    ss_res = ss_tot = 0.0
    for e in range(ys.shape[1]):
        slope, icpt = np.polyfit(ts, ys[:, e], 1)
        ss_res += float(((ys[:, e] - (slope * ts + icpt)) ** 2).sum())
        ss_tot += float(((ys[:, e] - ys[:, e].mean()) ** 2).sum())
    return 1 - ss_res / ss_tot


@pytest.fixture
def curved() -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(0)
    t = [3.0, 7.0, 10.0, 16.0]
    p, q = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    deltas = np.stack([ti * p + 0.08 * ti**2 * q + 0.3 * rng.normal(size=(6, 5)) for ti in t])
    return deltas, t


def test_lsq_matches_dense(curved):
    deltas, t = curved
    got = _fit(deltas, t, "lsq").drift.numpy()
    v = sum(ti * d for ti, d in zip(t, deltas, strict=True)) / sum(ti * ti for ti in t)
    np.testing.assert_allclose(got, t[-1] * v, rtol=1e-5, atol=1e-5)


def test_endpoint_is_last_delta(curved):
    deltas, t = curved
    np.testing.assert_allclose(_fit(deltas, t, "endpoint").drift.numpy(), deltas[-1], rtol=1e-6)


def test_pca_matches_dense(curved):
    deltas, t = curved
    flat = deltas.reshape(len(t), -1)
    v = np.linalg.svd(flat, full_matrices=False)[2][0]  # top right singular vector
    c = flat @ v
    slope, icpt = np.polyfit([0.0, *t], [0.0, *c], 1)
    want = ((slope * t[-1] + icpt) * v).reshape(deltas.shape[1:])
    np.testing.assert_allclose(_fit(deltas, t, "pca").drift.numpy(), want, rtol=1e-4, atol=1e-4)


def test_r2_matches_dense_and_drops_with_curvature(curved):
    deltas, t = curved
    got = _fit(deltas, t, "lsq").r2
    assert got == pytest.approx(_dense_r2(deltas, t), abs=1e-5)
    straight = np.stack([ti * deltas[0] / t[0] for ti in t])
    assert _fit(straight, t, "lsq").r2 == pytest.approx(1.0, abs=1e-6)
    assert got < 0.99  # the curved one is visibly less linear


def _sums(deltas: np.ndarray, t: list[float]) -> dict[str, float]:
    flat = deltas.reshape(len(t), -1).astype(np.float64)
    sd, std = flat.sum(0), np.asarray(t) @ flat
    return {"sum_sq_norms": float((flat**2).sum()), "sq_norm_sum": float(sd @ sd), "sq_norm_tsum": float(std @ std),
            "dot_tsum_sum": float(std @ sd)}  # fmt: skip


def test_pooled_r2_from_running_sums_matches_dense(curved):
    deltas, t = curved
    ss_tot, ss_res = pooled_sums(t, **_sums(deltas, t))
    ts = np.array([0.0, *t])
    ys = np.concatenate([np.zeros((1, *deltas.shape[1:])), deltas]).reshape(len(ts), -1)
    assert ss_tot == pytest.approx(float(((ys - ys.mean(0)) ** 2).sum()), rel=1e-12)
    assert pooled_r2(ss_tot, ss_res) == pytest.approx(_dense_r2(deltas, t), abs=1e-9)
    assert pooled_sums(t[:1], **_sums(deltas[:1], t[:1])) == (0.0, 0.0)  # two points: no R²
    assert pooled_r2(*pooled_sums(t[:1], **_sums(deltas[:1], t[:1]))) is None
    assert pooled_r2(*pooled_sums(t, **_sums(np.zeros_like(deltas), t))) is None  # nothing moves


@pytest.mark.parametrize("fit", ["lsq", "pca", "endpoint"])
def test_single_checkpoint_is_its_delta_and_r2_undefined(fit):
    d = np.random.default_rng(1).normal(size=(4, 3))
    res = _fit(d[None], [50.0], fit)
    np.testing.assert_allclose(res.drift.numpy(), d, rtol=1e-5, atol=1e-6)
    assert res.r2 is None


def test_rejects_too_many_deltas():
    acc = LineAccumulator([1.0], "lsq")
    acc.add(torch.ones(2))
    with pytest.raises(ValueError):
        acc.add(torch.ones(2))
