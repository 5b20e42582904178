"""The toy RLVR recipe, end to end at its --small setting: GRPO raises the reward, checkpoints carry their steps."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from toyrl import SMALL, problems, reward

from driftmerge.io.rundirs import discover

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy-rlvr" / "run.py"


def test_the_task_and_its_reward():
    pairs = problems(50, 2, rng=random.Random(0))
    assert all(p.endswith("=") and int(a) == sum(map(int, p[:-1].split("+"))) for p, a in pairs)
    assert reward("57", "57") == 1.0 and reward("56", "57") == 0.0 and reward("", "57") == 0.0


def test_grpo_kl_penalty_is_zero_at_the_start_and_grows_away_from_it():
    import copy
    from dataclasses import replace

    import torch
    from toyrl import _frozen, build, grpo_step

    cfg = replace(SMALL, hidden=32, layers=1, batch=4, group=4, kl_coef=0.5)
    torch.manual_seed(0)
    model, tok = build(cfg)
    ref = _frozen(model)
    pairs = problems(4, 2, rng=random.Random(0))
    # at the reference point k3 = exp(0) - 0 - 1 = 0 and so is its gradient: the same update as without the term
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    _, kl_a = grpo_step(a, tok, torch.optim.SGD(a.parameters(), lr=0.5), pairs, cfg, ref)
    torch.manual_seed(1)
    _, kl_b = grpo_step(b, tok, torch.optim.SGD(b.parameters(), lr=0.5), pairs, replace(cfg, kl_coef=0.0), ref)
    assert kl_a == 0.0 and kl_b == 0.0
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    # away from the start the estimate is positive and the penalty pulls back towards it
    away = copy.deepcopy(model)
    with torch.no_grad():
        for x in away.parameters():
            x.add_(0.05 * torch.randn_like(x))
    dist = {}
    for coef in (0.0, 2.0):
        c = copy.deepcopy(away)
        torch.manual_seed(2)
        _, kl = grpo_step(c, tok, torch.optim.SGD(c.parameters(), lr=0.01), pairs, replace(cfg, kl_coef=coef), ref)
        dist[coef] = sum(
            float((x.detach() - y).pow(2).sum()) for x, y in zip(c.parameters(), ref.parameters(), strict=True)
        )
        assert (kl > 0.0) == (coef > 0)
    assert dist[2.0] < dist[0.0]


@pytest.mark.slow
def test_small_recipe_end_to_end(tmp_path):
    out = tmp_path / "toy-run"
    done = subprocess.run([sys.executable, str(RECIPE), "--small", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = discover(out)
    steps = list(range(SMALL.save_every, SMALL.rl_steps + 1, SMALL.save_every))
    assert [f.step for f in found] == steps  # base/ has no step and is not a checkpoint
    for f in found:
        assert (f.path / "model.safetensors").is_file() and (f.path / "tokenizer.json").is_file()
    record = json.loads((out / "run.json").read_text())
    r = record["train_reward"]
    assert len(r) == SMALL.rl_steps
    first, last = sum(r[:50]) / 50, sum(r[-50:]) / 50
    assert last > first + 0.05, (first, last)  # GRPO raises the sampled reward
    acc = [e["accuracy"] for e in record["evals"]]
    assert max(acc[-3:]) > acc[0], acc  # and the held-out greedy accuracy
