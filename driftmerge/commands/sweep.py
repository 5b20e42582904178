"""Find how far to extrapolate: the reward of the model at each scale along the drift, on the user's own task.

Modes:

- ``weights`` (default): the base is loaded once and moved in place from scale to scale
  (:class:`driftmerge.evaluation.inplace.DriftedModel`), so a sweep costs one model load plus generation; each scale's
  completions are scored with a verifiable reward (:mod:`driftmerge.evaluation.rewards`).
- ``logits``: output-space extrapolation, ``z = z_base + alpha (z_1 - z_base)`` with ``z_1`` the model at scale 1
  (:mod:`driftmerge.evaluation.generation`); the sweep's values are alphas.
- ``eval_cmd``: each scale is written with ``apply`` into a temporary folder and an external command scores it;
  its last line of output is the reward (a number, or JSON with ``"reward"`` and optionally ``"se"``).

Per scale: the mean reward over prompts and samples, and its standard error over prompts
``se = sd(per-prompt means) / sqrt(prompts)`` (samples of one prompt are not independent draws of the task).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError
from driftmerge.evaluation.generation import SamplingOptions, read_prompts
from driftmerge.evaluation.scoring import ScaleResult, SweepResult, run_eval_cmd, score, summarize
from driftmerge.progress import Progress

MODES = ("weights", "logits")


@dataclass
class SweepOptions:
    scales: list[float]
    mode: str = "weights"  # weights | logits
    reward: str | None = "exact-number"  # built-in name or MODULE:FUNCTION; None with eval_cmd
    eval_cmd: str | None = None  # "CMD {model_dir}": an external evaluator per scale (weights mode)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    device: str = "auto"

    def validate(self) -> None:
        if not self.scales:
            raise InputError("--scales: give at least one scale")
        if any(not math.isfinite(s) for s in self.scales):
            raise InputError(f"--scales must be finite numbers, got {self.scales}")
        if len(set(self.scales)) != len(self.scales):
            raise InputError(f"--scales lists a scale twice: {self.scales}")
        if self.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.reward is None) == (self.eval_cmd is None):
            raise InputError("give exactly one of --reward or --eval-cmd")
        if self.eval_cmd is not None:
            if self.mode != "weights":
                raise InputError("--eval-cmd evaluates written models: it needs --mode weights")
            if "{model_dir}" not in self.eval_cmd:
                raise InputError("--eval-cmd must contain {model_dir}, where the model of each scale is written")
        self.sampling.validate()


def run_sweep(
    adapter: str | Path,
    prompts: str | Path | None,
    *,
    opts: SweepOptions,
    base: str | Path | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Score every scale of ``opts.scales`` (alphas in logits mode) and return the table."""
    from driftmerge.core.drift import scale_for_step, step_for_scale
    from driftmerge.io.sources import open_adapter

    opts.validate()
    _, adapter_data = open_adapter(adapter)
    meta = adapter_data.meta
    steps = {"base_step": meta.base_step, "s_ref": meta.s_ref}
    ck_scales = [(c.step, scale_for_step(c.step, **steps)) for c in meta.checkpoints]
    if opts.eval_cmd is not None:
        rows = _sweep_external(adapter, base, opts, progress)
        return SweepResult(opts.mode, rows, ck_scales, [], meta)
    if prompts is None:
        raise InputError("--prompts: give the JSON-lines file of prompts (and answers) to score")
    from driftmerge.evaluation.rewards import BUILT_IN, load_reward

    assert opts.reward is not None, "validate() allows no sweep without a reward or an evaluator"
    reward = load_reward(opts.reward)
    records = read_prompts(prompts, need_answer=opts.reward in BUILT_IN)
    runner = _weights_runner if opts.mode == "weights" else _logits_runner
    rows, completions = [], []
    for i, (scale, texts) in enumerate(runner(adapter, base, records, opts)):
        rewards = [[score(reward, rec, completion=t) for t in ts] for rec, ts in zip(records, texts, strict=True)]
        step = step_for_scale(scale, **steps)
        rows.append(summarize(scale, step, rewards=rewards))
        completions += [
            {"scale": scale, "prompt": p, "sample": k, "completion": t, "reward": r}
            for p, (ts, rs) in enumerate(zip(texts, rewards, strict=True))
            for k, (t, r) in enumerate(zip(ts, rs, strict=True))
        ]
        if progress:
            progress(i + 1, len(opts.scales), f"scale {scale:g}: reward {rows[-1].mean:.3f}")
    return SweepResult(opts.mode, rows, ck_scales, completions, meta)


def _weights_runner(
    adapter: str | Path, base: str | Path | None, records: list[dict[str, Any]], opts: SweepOptions
) -> Iterator[tuple[float, list[list[str]]]]:
    """Yield (scale, completions per prompt), moving one loaded model along the drift."""
    from driftmerge.core.devices import resolve_device
    from driftmerge.evaluation.generation import generate
    from driftmerge.evaluation.inplace import DriftedModel
    from driftmerge.io.models import load_tokenizer

    drifted = DriftedModel(adapter, base, resolve_device(opts.device))
    tok = load_tokenizer(drifted.base.path)
    prompts = [r["prompt"] for r in records]
    for scale in opts.scales:
        drifted.set_scale(scale)
        yield scale, generate(drifted.model, tok, prompts=prompts, opts=opts.sampling)


def _logits_runner(
    adapter: str | Path, base: str | Path | None, records: list[dict[str, Any]], opts: SweepOptions
) -> Iterator[tuple[float, list[list[str]]]]:
    """Yield (alpha, completions per prompt): the base (alpha 0) and the model at scale 1 in lockstep."""
    from driftmerge.core.devices import resolve_device
    from driftmerge.evaluation.generation import generate
    from driftmerge.evaluation.inplace import DriftedModel
    from driftmerge.io.models import load_causal_lm, load_tokenizer

    device = resolve_device(opts.device)
    late = DriftedModel(adapter, base, device)
    late.set_scale(1.0)
    early = load_causal_lm(late.base.path, device)
    tok = load_tokenizer(late.base.path)
    prompts = [r["prompt"] for r in records]
    for alpha in opts.scales:
        yield alpha, generate(late.model, tok, prompts=prompts, opts=opts.sampling, early=early, alpha=alpha)


def _sweep_external(
    adapter: str | Path, base: str | Path | None, opts: SweepOptions, progress: Progress | None
) -> list[ScaleResult]:
    """Write each scale's model with ``apply`` and let ``opts.eval_cmd`` score it."""
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.options import ApplyOptions

    assert opts.eval_cmd is not None, "an external evaluator's sweep"
    rows = []
    for i, scale in enumerate(opts.scales):
        with tempfile.TemporaryDirectory(prefix="driftmerge-sweep-") as tmp:
            options = ApplyOptions(scale=scale, base=None if base is None else str(base))
            applied = apply_drift(adapter, Path(tmp) / "model", options=options)
            mean, se = run_eval_cmd(opts.eval_cmd, applied.out_dir, scale=scale)
        rows.append(ScaleResult(scale, applied.step, mean, se, 0))
        if progress:
            progress(i + 1, len(opts.scales), f"scale {scale:g}: reward {mean:.3f}")
    return rows
