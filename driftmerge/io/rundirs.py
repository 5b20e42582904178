"""Find the checkpoints of a training run folder and pick some: TRL, verl and plain ``step*`` layouts.

- TRL / transformers ``Trainer``: ``RUN/checkpoint-N/`` (a Hugging Face model folder, or a PEFT adapter folder when
  the run trained LoRA).
- verl: ``RUN/global_step_N/actor/huggingface/`` (written with ``save_contents`` holding ``hf_model``, or by
  ``python -m verl.model_merger merge``); an actor folder holding only FSDP/Megatron shards is not a model folder.
- plain: ``RUN/step_N/``, ``RUN/stepN/``, ``RUN/ckpt-N/``, ``RUN/global_step_N/`` holding a model.

A step folder without Hugging Face weights is skipped with one warning naming it and why: an optimizer-only or
unfinished save, or weights sharded by the trainer's backend, with the command that gathers them (DeepSpeed ZeRO
``checkpoint-N/global_stepN/*model_states.pt``, FSDP ``checkpoint-N/pytorch_model_fsdp_0/*.distcp``, torch
distributed checkpoints ``*.distcp`` + ``.metadata``). When no folder is usable, the error says the same.

Selection: ``every`` keeps steps that are multiples of K, ``steps_range`` keeps ``A <= step <= B`` (either side may
be open), ``last`` keeps the last N; they apply in that order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from driftmerge.errors import InputError
from driftmerge.io.adapter import ADAPTER_WEIGHTS
from driftmerge.io.checkpoints import MODEL_WEIGHTS

logger = logging.getLogger("driftmerge")

_NAMED = re.compile(r"^(?:checkpoint|global_step|step|ckpt)[-_]?(\d+)$")
_WEIGHTS = (*MODEL_WEIGHTS, ADAPTER_WEIGHTS)  # adapter weights: a run trained with LoRA (io/lora_run.py)
VERL_MERGE_HINT = (
    "convert it with verl's model merger first, e.g. `python -m verl.model_merger merge --backend fsdp "
    "--local_dir {actor} --target_dir {actor}/huggingface`"
)
NO_WEIGHTS = "no weights (optimizer-only or unfinished save)"
# What each sharded layout is, and the command that gathers it into Hugging Face weights the folder then holds.
# DeepSpeed's zero_to_fp32.py (copied into every ZeRO checkpoint; also `python -m deepspeed.utils.zero_to_fp32`):
# CHECKPOINT_DIR OUTPUT_DIR [--safe_serialization]; accelerate: merge-weights CHECKPOINT_DIRECTORY OUTPUT_PATH (writes
# OUTPUT_PATH/model.safetensors); torch: format_utils dcp_to_torch SRC DST (DST: one torch.save file).
SHARDED = {
    "deepspeed": (
        "DeepSpeed ZeRO shards ({shards})",
        "gather them with `{script} {ck} {ck} --safe_serialization`",
    ),
    "fsdp": ("FSDP sharded weights ({shards})", "merge them with `accelerate merge-weights {shards} {ck}`"),
    "dcp": (
        "a torch distributed checkpoint ({shards})",
        "convert it with `python -m torch.distributed.checkpoint.format_utils dcp_to_torch {shards} "
        "{ck}/pytorch_model.bin` (keys must be the model's parameter names, next to its config.json)",
    ),
}


@dataclass(frozen=True)
class Found:
    step: int
    path: Path


@dataclass(frozen=True)
class Skipped:
    """A step folder that holds no usable weights: ``kind`` is ``empty`` or a :data:`SHARDED` key."""

    name: str
    kind: str
    reason: str  # what was found and, for shards, the command that gathers them


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and any((folder / w).is_file() for w in _WEIGHTS)


def _is_dcp(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and any(folder.glob("*.distcp"))


def _sharded(ck: Path) -> tuple[str, dict[str, str]] | None:
    """The sharded layout of a checkpoint folder without Hugging Face weights, and what its hint names."""
    subdirs = sorted(p for p in ck.iterdir() if p.is_dir())
    for sub in subdirs:  # Trainer + DeepSpeed: checkpoint-N/global_stepN/{zero_pp_rank_*_,}mp_rank_*_model_states.pt
        if sub.name.startswith("global_step") and any(sub.glob("*model_states.pt")):
            script = f"python {ck / 'zero_to_fp32.py'}" if (ck / "zero_to_fp32.py").is_file() else None
            return "deepspeed", {"shards": str(sub), "script": script or "python -m deepspeed.utils.zero_to_fp32"}
    for sub in subdirs:  # Trainer + FSDP with SHARDED_STATE_DICT: checkpoint-N/pytorch_model_fsdp_0/*.distcp
        if sub.name.startswith("pytorch_model_fsdp") and any(sub.glob("*.distcp")):
            return "fsdp", {"shards": str(sub)}
    for folder in (ck, *(s for s in subdirs if not s.name.startswith("optimizer"))):
        if _is_dcp(folder):
            return "dcp", {"shards": str(folder)}
    return None


def _skipped(ck: Path) -> Skipped:
    shard = _sharded(ck)
    if shard is None:
        return Skipped(ck.name, "empty", NO_WEIGHTS)
    kind, names = shard
    what, hint = SHARDED[kind]
    return Skipped(ck.name, kind, f"{what.format(**names)}, not Hugging Face weights; {hint.format(ck=ck, **names)}")


def scan(run_dir: str | Path) -> tuple[list[Found], list[Skipped]]:
    """The model folders directly under ``run_dir`` in step order, and the step folders skipped (in name order).

    Raises for a missing run folder, two folders of one step, and a verl actor not converted to Hugging Face format.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder (--run-dir wants the folder holding checkpoint-N/ etc.)")
    found: dict[int, Path] = {}
    skipped: list[Skipped] = []
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
            skipped.append(_skipped(child))
            continue
        if step in found:
            raise InputError(f"{run}: both {found[step].name} and {child.name} are step {step}; keep one")
        found[step] = model
    return [Found(s, found[s]) for s in sorted(found)], skipped


def discover(run_dir: str | Path, warn: Callable[[str], None] = logger.warning) -> list[Found]:
    """Checkpoint folders directly under ``run_dir``, ordered by step; ``warn`` gets one line per folder skipped.

    With step folders but none usable, the error names them and why (for shards, the command that gathers them).
    """
    found, skipped = scan(run_dir)
    if not found:
        raise InputError(unusable(Path(run_dir), skipped))
    for s in skipped:
        warn(f"{s.name}: {s.reason}; skipped")
    return found


def unusable(run: Path, skipped: list[Skipped]) -> str:
    """The one-line error for a run folder without a usable checkpoint: what was found, grouped by why."""
    if not skipped:
        return f"{run}: no checkpoint folders (checkpoint-N/, global_step_N/actor/huggingface/, step_N/)"
    groups: dict[str, list[Skipped]] = {}
    for s in skipped:
        groups.setdefault(s.kind, []).append(s)
    parts = []
    for group in groups.values():
        last = group[-1]
        likewise = "" if len(group) == 1 else f" (shown for {last.name}; likewise for each)"
        parts.append(f"{', '.join(s.name for s in group)}: {last.reason}{likewise}")
    n = len(skipped)
    return f"{run}: {n} checkpoint folder{'s' if n > 1 else ''}, none with Hugging Face weights; " + "; ".join(parts)


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
