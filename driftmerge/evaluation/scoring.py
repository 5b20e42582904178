"""Scores along the drift: a reward per completion, their mean and standard error per scale, and an external
evaluator's score.

Per scale: the mean reward over prompts and samples, and its standard error over prompts
``se = sd(per-prompt means) / sqrt(prompts)`` (samples of one prompt are not independent draws of the task).
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError
from driftmerge.evaluation.rewards import Reward
from driftmerge.schema import DriftMeta


@dataclass
class ScaleResult:
    scale: float
    step: float
    mean: float
    se: float | None  # None: one prompt, or an external evaluator that gave none
    n: int  # rewards averaged (prompts x samples), 0 for an external evaluator
    prompt_means: list[float] = field(default_factory=list)


@dataclass
class SweepResult:
    mode: str
    rows: list[ScaleResult]
    checkpoint_scales: list[tuple[int, float]]  # (step, scale) of each checkpoint the drift was fitted on
    completions: list[dict[str, Any]]  # every sample: scale, prompt index, sample, completion, reward
    meta: DriftMeta

    @property
    def best(self) -> ScaleResult:
        """The highest mean reward; a tie goes to the scale nearest 1 (the least extrapolation)."""
        return max(self.rows, key=lambda r: (r.mean, -abs(r.scale - 1.0)))


def summarize(scale: float, step: float, *, rewards: list[list[float]]) -> ScaleResult:
    """Mean over all rewards, standard error over the per-prompt means."""
    means = [statistics.fmean(r) for r in rewards]
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else None
    return ScaleResult(scale, step, statistics.fmean(x for r in rewards for x in r), se, sum(map(len, rewards)), means)


def score(reward: Reward, rec: dict[str, Any], *, completion: str) -> float:
    try:
        value = float(reward(rec["prompt"], completion, rec.get("answer")))
    except Exception as exc:  # the user's reward failed: name it
        raise InputError(f"the reward function failed on a completion ({type(exc).__name__}: {exc})") from exc
    if not math.isfinite(value):
        raise InputError(f"the reward function returned {value}; rewards must be finite numbers")
    return value


def run_eval_cmd(template: str, model_dir: Path, *, scale: float) -> tuple[float, float | None]:
    """Run ``template`` with ``{model_dir}`` / ``{scale}`` filled in; its last output line is the reward."""
    cmd = template.replace("{model_dir}", shlex.quote(str(model_dir))).replace("{scale}", f"{scale:g}")
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise InputError(f"--eval-cmd failed at scale {scale:g} (exit {done.returncode}): {tail}")
    lines = done.stdout.strip().splitlines()
    last = lines[-1].strip() if lines else ""
    try:
        value = json.loads(last)
    except ValueError:
        value = None
    if isinstance(value, dict) and "reward" in value:
        mean, se = value["reward"], value.get("se")
    else:
        mean, se = value, None
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise InputError(
            f"--eval-cmd at scale {scale:g}: its last line of output must be the reward (a number, or JSON with"
            f' "reward"), got {last[:80]!r}'
        )
    return float(mean), (float(se) if isinstance(se, (int, float)) else None)
