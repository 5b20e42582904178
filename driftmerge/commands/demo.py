"""The embedded default job: a real (tiny) RLVR run, extracted at rank 1 and extrapolated to scale 1.5.

The run ships with driftmerge (``driftmerge/data/toy-rlvr``, about 2 MB): the base and four GRPO checkpoints of the
toy recipe (``python recipes/toy-rlvr/run.py --small --seed 0``: a tiny Llama-shaped model learning 2-digit
addition with a 0/1 reward; see that folder's README.md). The demo fits the drift, writes the model at scale 1.5
(step 300, 100 steps beyond the last checkpoint) and scores the base, the last checkpoint, the rank-1 model at
scale 1 and the extrapolated one on the recipe's held-out problems, whatever the outcome.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from driftmerge.commands.apply import ApplyResult, apply_drift
from driftmerge.commands.extract import ExtractOptions, ExtractResult, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.progress import Progress

DEMO_STEPS = (50, 100, 150, 200)
DEMO_SCALE = 1.5
DATA = "toy-rlvr"


@dataclass
class DemoReport:
    folder: Path
    extracted: ExtractResult
    applied: ApplyResult
    accuracy: dict[str, float]  # held-out greedy accuracy: base, last checkpoint, rank-1 at scale 1, at DEMO_SCALE
    problems: int


def copy_run(folder: Path) -> Path:
    """The shipped toy run, copied to ``folder/run`` (base/, checkpoint-<step>/, run.json)."""
    src = resources.files("driftmerge") / "data" / DATA
    with resources.as_file(src) as path:
        shutil.copytree(path, folder / "run", ignore=shutil.ignore_patterns("README.md"))
    return folder / "run"


def run_demo(folder: str | Path, progress: Progress | None = None) -> DemoReport:
    """Copy the run under ``folder``, extract at rank 1, apply at scale 1 and 1.5, score them all."""
    from driftmerge.evaluation.addition import accuracy, held_out, max_new_tokens
    from driftmerge.io.models import load_causal_lm, load_tokenizer

    folder = Path(folder)
    run = copy_run(folder)
    cfg = json.loads((run / "run.json").read_text())["config"]  # the recipe's ToyConfig, as recorded
    cks = [run / f"checkpoint-{s}" for s in DEMO_STEPS]
    adapter = folder / "driftmerge-adapter"
    cmd = "driftmerge extract run/base " + " ".join(f"run/checkpoint-{s}" for s in DEMO_STEPS)
    extracted = extract(
        run / "base", cks, out_dir=adapter, options=ExtractOptions(rank=1), progress=progress, command=cmd
    )
    applied = apply_drift(
        adapter,
        folder / "driftmerge-model",
        options=ApplyOptions(scale=DEMO_SCALE),
        progress=progress,
        command=f"driftmerge apply driftmerge-adapter --scale {DEMO_SCALE}",
    )
    at_one = apply_drift(adapter, folder / "model-scale-1", options=ApplyOptions(scale=1.0), progress=progress)
    problems = held_out(cfg["eval_size"], cfg["digits"], seed=cfg["seed"])
    tok = load_tokenizer(run / "base")
    models = {"base": run / "base", "last": cks[-1], "rank1": at_one.out_dir, "extrapolated": applied.out_dir}
    acc = {
        k: accuracy(load_causal_lm(p), tok, pairs=problems, max_new_tokens=max_new_tokens(cfg["digits"]))
        for k, p in models.items()
    }
    return DemoReport(folder, extracted, applied, acc, len(problems))
