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
