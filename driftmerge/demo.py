"""The embedded default job: a tiny Llama-shaped run with a planted drift, extracted and extrapolated.

The planted truth is known, so the demo can say how far the extrapolated model (scale 1.5, step 450) lies from
where the planted line says the run would be, compared with the last checkpoint (step 300).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from driftmerge.apply import ApplyResult, apply_drift
from driftmerge.checkpoints import Checkpoint
from driftmerge.extract import ExtractOptions, ExtractResult, extract
from driftmerge.synthetic import SyntheticRun, make_run

DEMO_STEPS = (100, 200, 300)
DEMO_SCALE = 1.5


@dataclass
class DemoReport:
    run: SyntheticRun
    extracted: ExtractResult
    applied: ApplyResult
    err_extrapolated: float  # ‖W_apply − W_true(450)‖ / ‖W_true(450) − W0‖ over the planted parameters
    err_last_checkpoint: float  # the same for the last checkpoint, as the do-nothing baseline
    logits_shape: tuple[int, ...]


def run_demo(folder: str | Path, progress=None) -> DemoReport:  # type: ignore[no-untyped-def]
    """Build the run under ``folder``, extract at rank 1, apply at scale 1.5, check against the planted truth."""
    folder = Path(folder)
    run = make_run(folder / "run", arch="llama", steps=DEMO_STEPS, noise=0.05, hidden=64, layers=2)
    adapter = folder / "driftmerge-adapter"
    cmd = "driftmerge extract run/base run/checkpoint-100 run/checkpoint-200 run/checkpoint-300"
    extracted = extract(run.base, run.checkpoints, adapter, ExtractOptions(rank=1), progress=progress, command=cmd)
    model_dir = folder / "driftmerge-model"
    applied = apply_drift(adapter, model_dir, scale=DEMO_SCALE, progress=progress,
                          command=f"driftmerge apply driftmerge-adapter --scale {DEMO_SCALE}")  # fmt: skip
    base, out, last = Checkpoint(run.base), Checkpoint(model_dir), Checkpoint(run.checkpoints[-1])
    num_ext = num_last = den = 0.0
    for name, direction in run.directions.items():
        if name not in base.infos:
            continue
        truth = base.get(name).float() + DEMO_SCALE * direction
        num_ext += float((out.get(name).float() - truth).pow(2).sum())
        num_last += float((last.get(name).float() - truth).pow(2).sum())
        den += float((DEMO_SCALE * direction).pow(2).sum())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits  # (1, 8, vocab)
    if not torch.isfinite(logits).all():
        raise RuntimeError("the applied model produced non-finite logits")
    return DemoReport(run, extracted, applied, (num_ext / den) ** 0.5, (num_last / den) ** 0.5, tuple(logits.shape))
