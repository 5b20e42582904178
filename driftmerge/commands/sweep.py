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

The sweep may take any scale, negative ones included (it measures; ``apply`` wants ``--allow-negative-scale`` for
those). :func:`preflight` checks the base and every folder the sweep will write before the long part starts.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError, OutputError
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
    allow_other_base: bool = False  # move a --base whose weights differ from the recorded base (apply's flag)

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
            {
                "scale": scale,
                "prompt_index": p,
                "prompt": rec["prompt"],
                "answer": rec.get("answer"),
                "sample": k,
                "completion": t,
                "reward": r,
            }
            for p, (rec, ts, rs) in enumerate(zip(records, texts, rewards, strict=True))
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

    drifted = DriftedModel(adapter, base, resolve_device(opts.device), allow_other_base=opts.allow_other_base)
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
    late = DriftedModel(adapter, base, device, allow_other_base=opts.allow_other_base)
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
            options = ApplyOptions(
                scale=scale,
                base=None if base is None else str(base),
                allow_negative_scale=True,  # the user listed this scale: the sweep measures it
                allow_other_base=opts.allow_other_base,
            )
            applied = apply_drift(adapter, Path(tmp) / "model", options=options)
            mean, se = run_eval_cmd(opts.eval_cmd, applied.out_dir, scale=scale)
        rows.append(ScaleResult(scale, applied.step, mean, se, 0))
        if progress:
            progress(i + 1, len(opts.scales), f"scale {scale:g}: reward {mean:.3f}")
    return rows


def preflight(
    adapter: str | Path,
    *,
    base: str | Path | None,
    out: str | Path,
    apply_best: str | Path | None,
    overwrite: bool,
    allow_other_base: bool = False,
) -> None:
    """Before the sweep: the base must be the adapter's (:func:`driftmerge.io.sources.open_base`), and the report
    folder ``out`` and ``apply_best`` must be writable where they are, not overlap each other or an input, and not
    exist unless ``overwrite``; so no sweep is spent on a write that then fails."""
    from driftmerge.io.outputs import check_output_dir
    from driftmerge.io.sources import open_adapter, open_base

    adapter_dir, adapter_data = open_adapter(adapter)
    base_ck = open_base(adapter_data, base, allow_other_base=allow_other_base)
    base_ck.close()
    inputs = [adapter_dir, base_ck.path]
    targets = [Path(out), *([] if apply_best is None else [Path(apply_best)])]
    for target in targets:
        check_output_dir(target, inputs, overwrite=overwrite)
        _check_writable(target)
    if apply_best is not None:
        report, model = (t.resolve() for t in targets)
        if report == model or report.is_relative_to(model) or model.is_relative_to(report):
            raise OutputError(f"{apply_best}: --apply-best and the report folder -o {out} overlap; give two folders")


def _check_writable(target: Path) -> None:
    """The folder that will hold ``target`` (its nearest existing ancestor) must be a folder this process can
    write into."""
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{target}: cannot create it, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: cannot write into {parent} (permission denied); choose another folder")
