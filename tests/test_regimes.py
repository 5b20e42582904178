"""The toy recipe's regime grid (recipes/toy-rlvr/regimes.py): every run measured with driftmerge's own commands and
the bookkeeping between the measures right, a stopped grid resumes without retraining, and the predictor scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from measures import SCALES
from regime_report import PREDICTORS, predictors, tables

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy-rlvr" / "regimes.py"
TINY = ["--widths", "32", "--lrs", "5e-4", "--seeds", "0", "--steps", "40", "--checkpoints", "4", "--workers", "1"]
IDS = {"rl-w32-lr0.0005-kl0-s0", "rl-w32-lr0.0005-kl0.1-s0", "sft-w32-lr0.0005-kl0-s0"}


def _grid(out: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(RECIPE), "-o", str(out), *TINY], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes") / "grid"
    first = _grid(out)
    return out, json.loads((out / "regimes.json").read_text()), first


def test_every_run_is_measured(grid):
    out, record, _ = grid
    runs = {r["id"]: r for r in record["runs"]}
    assert set(runs) == IDS
    for r in runs.values():
        assert [e["step"] for e in r["evals"]] == [0, 10, 20, 30, 40]
        assert (r["acc_base"], r["acc_last"]) == (r["evals"][0]["accuracy"], r["evals"][-1]["accuracy"])
        # fitted on the first half (steps 10, 20), applied at step 40, against the real checkpoint there
        assert r["extrap_from_step"] == 20
        assert r["extrap_gain"] == pytest.approx(r["acc_extrap"] - r["acc_last"])
        assert r["extrap_gain_full"] == pytest.approx(r["acc_extrap_full"] - r["acc_last"])
        gain = r["acc_last"] - r["acc_base"]
        want = (r["acc_rank1"] - r["acc_base"]) / gain if gain > 0 else None
        assert r["rank1_share"] == (pytest.approx(want) if want is not None else None)
        sweep = {row["scale"]: row["accuracy"] for row in r["sweep"]}
        assert list(sweep) == SCALES
        assert sweep[0.0] == r["acc_base"]  # scale 0 is the base itself
        assert abs(sweep[1.0] - r["acc_rank1"]) <= 2 / 256  # the base moved in place against the written model
        assert sweep[r["sweep_best"]] == max(sweep.values())
        for half in ("all", "early"):
            assert set(r[half]) == set(PREDICTORS)
            assert 0.0 <= r[half]["energy_rank1"] <= 1.0 and r[half]["r2"] <= 1.0
        assert r["all"] != r["early"]
        # the run's checkpoints stay; the models written to score them do not
        assert (out / r["id"] / "run" / "checkpoint-40" / "model.safetensors").is_file()
        assert not [p for p in (out / r["id"] / "work").iterdir() if p.name.endswith("-model")]
    assert runs["rl-w32-lr0.0005-kl0.1-s0"]["mean_train_kl"] > 0.0
    assert runs["rl-w32-lr0.0005-kl0-s0"]["mean_train_kl"] == 0.0
    assert runs["sft-w32-lr0.0005-kl0-s0"]["mean_train_kl"] is None
    assert (out / "regimes.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 32 | 0.0005 | 40 | RL, KL 0.1 |" in (out / "regimes.md").read_text()


def test_a_finished_grid_is_read_back_not_retrained(grid):
    out, record, _ = grid
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert len(stamps) == 3
    again = _grid(out)
    assert "supervised start" not in again.stdout and "training" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "regimes.json").read_text())["runs"] == record["runs"]


def _run(gain: float, r2: float, energy: float, mode: str = "rl", lr: float = 1e-4) -> dict:
    early = {k: 0.5 for k in PREDICTORS} | {"r2": r2, "energy_rank1": energy}
    return {"mode": mode, "extrap_gain": gain, "early": early, "lr": lr, "acc_base": 0.3, "acc_last": 0.3 + r2 / 10}


def test_predictor_scores():
    # r2 orders the gains exactly and separates the positive ones; energy runs against them
    runs = [_run(g, r2, 1 - r2) for g, r2 in ((-0.2, 0.5), (-0.1, 0.6), (0.05, 0.8), (0.1, 0.9))]
    runs.append(_run(0.3, 0.1, 0.1, mode="sft"))  # counted only over all runs
    got = predictors(runs)
    rl, every = got["rl"]["scores"], got["all"]["scores"]
    assert (got["rl"]["runs"], got["rl"]["positive_gain"], got["all"]["positive_gain"]) == (4, 2, 3)
    assert rl["r2"] == {"spearman": pytest.approx(1.0), "auc": pytest.approx(1.0)}
    assert rl["energy_rank1"] == {"spearman": pytest.approx(-1.0), "auc": pytest.approx(0.0)}
    assert every["r2"]["auc"] == pytest.approx(4 / 6)  # the SFT run's low r2 loses to both negatives
    # a measure that does not vary predicts nothing; without a positive run there is no AUC
    assert rl["elem_r2_median"] == {"spearman": None, "auc": pytest.approx(0.5)}
    assert predictors([_run(-0.1, 0.5, 0.5), _run(-0.2, 0.6, 0.4)])["rl"]["scores"]["r2"]["auc"] is None
    # within one learning rate, and against the learning rate and the run's own gain
    two = [_run(g, r2, 0.5, lr=lr) for g, r2, lr in ((-0.2, 0.5, 1e-3), (-0.1, 0.6, 1e-3), (0.0, 0.7, 1e-4))]
    two.append(_run(0.1, 0.4, 0.5, lr=1e-4))
    got = predictors(two)["rl"]
    assert got["within_lr"]["r2"] == {"0.0001": pytest.approx(-1.0), "0.001": pytest.approx(1.0)}
    # ranks: lr (3.5, 3.5, 1.5, 1.5), accuracy gain (2, 3, 4, 1), extrapolation gain (1, 2, 3, 4)
    assert got["gain_vs"] == {"lr": pytest.approx(-2 / 5**0.5), "accuracy_gain": pytest.approx(-0.2)}


def test_the_table_names_each_setting_once(grid):
    _, record, _ = grid
    text = tables(record)
    for name in ("RL, no KL", "RL, KL 0.1", "SFT"):
        assert text.count(f"| 32 | 0.0005 | 40 | {name} |") == (1 if name == "SFT" else 2)  # measures; claims
