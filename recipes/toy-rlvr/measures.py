"""What the regime grid measures on one toy run, each with driftmerge's own commands (``analyze``, ``extract``,
``apply``, ``sweep``), on the run's checkpoints ``checkpoint-<step>/`` in ``folder/run``.

- ``all`` / ``early``: ``analyze`` over all checkpoints / over the first half of them (what a user could see when
  deciding whether to extrapolate): pooled R², median per-tensor R², per-element R² median and share above 0.7,
  rank-1 energy (energy-weighted over matrices), R² of the model's projection on its drift direction;
- ``rank1_share``: ``extract --rank 1`` over all checkpoints, ``apply --scale 1``; its accuracy gain over the base as a
  share of the last checkpoint's, ``(acc_rank1 - acc_base) / (acc_last - acc_base)`` (None when the run did not gain);
- ``extrap_gain``: ``extract`` (the defaults: lsq, rank 1) over the first half, ``apply --step <last step>``;
  ``acc_extrap - acc_last``; ``extrap_gain_full`` the same at full rank (``--rank 1.0``);
- ``sweep_best``: ``sweep`` of the all-checkpoint rank-1 adapter over ``SCALES`` on the held-out problems: the scale
  with the highest greedy accuracy (a tie goes to the scale nearest 1).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from toyrl import ToyConfig, write_prompts

from driftmerge.commands.analyze import AnalyzeOptions, analyze
from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.commands.sweep import SweepOptions, run_sweep
from driftmerge.evaluation.addition import accuracy
from driftmerge.evaluation.generation import SamplingOptions
from driftmerge.io.models import load_causal_lm

SCALES = [0.0, 0.5, 1.0, 1.25, 1.5, 2.0]
ANALYZE_KEYS = ("r2", "r2_tensor_median", "elem_r2_median", "elem_r2_share_above", "energy_rank1")


def measure(
    folder: Path, cfg: ToyConfig, *, tok: Any, held_out: list[tuple[str, str]], evals: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every measure of one run (module docstring); the applied models are removed once scored."""
    t0 = time.perf_counter()
    run, work = folder / "run", folder / "work"
    steps = [e["step"] for e in evals[1:]]
    cks = [run / f"checkpoint-{s}" for s in steps]
    half = cks[: len(cks) // 2]
    real = {e["step"]: e["accuracy"] for e in evals}
    acc_base, acc_last = real[0], real[steps[-1]]

    def acc(model_dir: Path) -> float:
        score = accuracy(load_causal_lm(model_dir), tok, pairs=held_out, max_new_tokens=cfg.max_new_tokens)
        shutil.rmtree(model_dir)
        return score

    out: dict[str, Any] = {"acc_base": acc_base, "acc_last": acc_last}
    for name, group in (("all", cks), ("early", half)):
        opts = AnalyzeOptions(sample_frac=0.05, figures=False)  # the numbers only: no one looks at 126 reports' figures
        rep = analyze(run / "base", group, out_dir=work / f"analysis-{name}", options=opts)
        m = rep.report["model"]
        out[name] = {k: m[k] for k in ANALYZE_KEYS} | {"projection_r2": (m["projection_line"] or {}).get("r2")}

    extract(run / "base", cks, out_dir=work / "rank1", options=ExtractOptions(rank=1))
    apply_drift(work / "rank1", work / "rank1-model", options=ApplyOptions(scale=1.0))
    out["acc_rank1"] = acc(work / "rank1-model")
    gain = acc_last - acc_base
    out["rank1_share"] = (out["acc_rank1"] - acc_base) / gain if gain > 0 else None

    for key, rank in (("", 1), ("_full", 1.0)):
        extract(run / "base", half, out_dir=work / f"early{key}", options=ExtractOptions(rank=rank))
        apply_drift(work / f"early{key}", work / f"early{key}-model", options=ApplyOptions(step=steps[-1]))
        out[f"acc_extrap{key}"] = acc(work / f"early{key}-model")
        out[f"extrap_gain{key}"] = out[f"acc_extrap{key}"] - acc_last
    out["extrap_from_step"] = steps[len(half) - 1]

    prompts = write_prompts(work / "held_out.jsonl", held_out)
    sampling = SamplingOptions(max_new_tokens=cfg.max_new_tokens, batch_size=256)
    sw = run_sweep(work / "rank1", prompts, opts=SweepOptions(SCALES, sampling=sampling, device="cpu"))
    out["sweep"] = [{"scale": r.scale, "accuracy": r.mean} for r in sw.rows]
    out["sweep_best"] = sw.best.scale
    out["measure_seconds"] = time.perf_counter() - t0
    return out
