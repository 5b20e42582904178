"""Find the checkpoints of a training run folder and pick some: TRL, verl and plain ``step*`` layouts.

- TRL / transformers ``Trainer``: ``RUN/checkpoint-N/`` (a Hugging Face model folder, or a PEFT adapter folder when
  the run trained LoRA).
- verl: ``RUN/global_step_N/actor/huggingface/`` (written with ``save_contents`` holding ``hf_model``, or by
  ``python -m verl.model_merger merge``); an actor folder holding only FSDP/Megatron shards is not a model folder.
- plain: ``RUN/step_N/``, ``RUN/stepN/``, ``RUN/ckpt-N/``, ``RUN/global_step_N/`` holding a model.

Selection: ``every`` keeps steps that are multiples of K, ``steps_range`` keeps ``A <= step <= B`` (either side may
be open), ``last`` keeps the last N; they apply in that order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from driftmerge.errors import InputError
from driftmerge.io.adapter import ADAPTER_WEIGHTS
from driftmerge.io.checkpoints import MODEL_WEIGHTS

_NAMED = re.compile(r"^(?:checkpoint|global_step|step|ckpt)[-_]?(\d+)$")
_WEIGHTS = (*MODEL_WEIGHTS, ADAPTER_WEIGHTS)  # adapter weights: a run trained with LoRA (io/lora_run.py)
VERL_MERGE_HINT = (
    "convert it with verl's model merger first, e.g. `python -m verl.model_merger merge --backend fsdp "
    "--local_dir {actor} --target_dir {actor}/huggingface`"
)


@dataclass(frozen=True)
class Found:
    step: int
    path: Path


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and any((folder / w).is_file() for w in _WEIGHTS)


def discover(run_dir: str | Path) -> list[Found]:
    """Checkpoint folders directly under ``run_dir``, ordered by step."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder (--run-dir wants the folder holding checkpoint-N/ etc.)")
    found: dict[int, Path] = {}
    for child in sorted(run.iterdir()):
        m = _NAMED.match(child.name)
        if not m or not child.is_dir():
            continue
        step = int(m.group(1))
        actor = child / "actor"
        if _is_model(actor / "huggingface"):
            model = actor / "huggingface"
        elif _is_model(child):
            model = child
        elif actor.is_dir():
            raise InputError(
                f"{actor}: a verl actor checkpoint that is not in Hugging Face format; "
                + VERL_MERGE_HINT.format(actor=actor)
            )
        else:
            continue  # an optimizer-only or unfinished save: not a model
        if step in found:
            raise InputError(f"{run}: both {found[step].name} and {child.name} are step {step}; keep one")
        found[step] = model
    if not found:
        raise InputError(f"{run}: no checkpoint folders (checkpoint-N/, global_step_N/actor/huggingface/, step_N/)")
    return [Found(s, found[s]) for s in sorted(found)]


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``A:B``, ``A:`` or ``:B`` → (A, B) with open sides None."""
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m or not (m.group(1) or m.group(2)):
        raise InputError(f"--steps-range: expected A:B, A: or :B with integer steps, got {text!r}")
    lo, hi = (int(g) if g else None for g in m.groups())
    if lo is not None and hi is not None and hi < lo:
        raise InputError(f"--steps-range {text}: the end is before the start")
    return lo, hi


def select(
    found: list[Found], *, every: int | None = None, last: int | None = None, steps_range: str | None = None
) -> list[Found]:
    """Apply ``every``, then ``steps_range``, then ``last``; at least one checkpoint must remain."""
    out = list(found)
    if every is not None:
        if every < 1:
            raise InputError(f"--every must be at least 1, got {every}")
        out = [f for f in out if f.step % every == 0]
    if steps_range is not None:
        lo, hi = parse_range(steps_range)
        out = [f for f in out if (lo is None or f.step >= lo) and (hi is None or f.step <= hi)]
    if last is not None:
        if last < 1:
            raise InputError(f"--last must be at least 1, got {last}")
        out = out[-last:]
    if not out:
        have = ", ".join(str(f.step) for f in found)
        raise InputError(f"no checkpoint left after --every/--steps-range/--last (the run has steps {have})")
    return out
