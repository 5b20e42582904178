"""Re-grounding for frameworks driven from the shell (verl, OpenRLHF): watch a run folder, and whenever a window of
``every`` (M) steps is complete, write the model ``jump`` (N) steps ahead along its fitted line as a Hugging Face
checkpoint for the next training stage to resume from.

Windows: the first starts at the base (``base``, step ``base_step``) or, without one, at the first checkpoint;
a window from step s ends at s + M once the checkpoint of step s + M exists, and is fitted with ``extract`` over
its start and the run's checkpoints in (s, s + M]; the result ``apply --scale (M + N) / M`` is written to
``OUT/checkpoint-<s + M + N>``, which is where the next window starts (training resumes there and saves its
checkpoints under their own steps). ``OUT/reground.json`` records the windows done, so the loop can be stopped and
started again; each window's adapter stays in ``OUT/drift_<s>-<s + M>`` for inspection.

The written folder is a checkpoint a transformers / TRL ``Trainer`` resumes from (``resume_from_checkpoint``;
``get_last_checkpoint(OUT)`` finds the newest), made from the window's end checkpoint ``E`` (step e = s + M):

- ``trainer_state.json``: E's, with ``global_step`` e + N (and ``epoch`` scaled alike), so training continues at
  step e + N; without one in E (a run not saved by a Trainer), ``{"global_step": e + N}``.
- ``optimizer.pt``: ``optimizer="keep"`` copies E's (Adam's moments and step counts as they were at e);
  ``"reset"`` keeps E's parameter groups (learning rate, betas, ...) and drops every parameter's state, so Adam
  starts its moments and bias correction afresh, as the callback's ``"reset"`` does for the moved parameters.
- ``scheduler.pt``: E's, advanced by N steps (``last_epoch``, ``_step_count``), so the learning-rate schedule
  stands where ``global_step`` does. transformers loads optimizer and scheduler only when both files are there.
- ``rng_state*.pth``, ``scaler.pt``, ``training_args.bin``, ``entropy_ctrl_state.json`` (GRPOTrainer's adaptive
  entropy): copied from E.

A run trained with LoRA (PEFT adapter checkpoints) is refused: the extrapolated model is a full model, which the
adapter trainer cannot resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftmerge.core.reground import OPTIMIZER_STATE
from driftmerge.core.trajectory import Fit
from driftmerge.errors import InputError
from driftmerge.io.outputs import write_text_atomic

STATE = "reground.json"
TRAINER_STATE, OPTIMIZER, SCHEDULER = "trainer_state.json", "optimizer.pt", "scheduler.pt"
COPIED = ("rng_state*.pth", "scaler.pt", "training_args.bin", "entropy_ctrl_state.json")  # from E, unchanged


@dataclass
class Window:
    start: int
    end: int
    output: int  # step of the extrapolated checkpoint: end + jump

    @property
    def folder(self) -> str:
        return checkpoint_name(self.output)


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``: the name transformers' ``get_last_checkpoint`` looks for."""
    return f"checkpoint-{step}"


def reground_run_dir(
    run_dir: str | Path,
    *,
    every: int,
    jump: int,
    base: str | Path | None = None,
    base_step: int = 0,
    out: str | Path | None = None,
    rank: int | float = 1,
    fit: Fit = "lsq",
    optimizer: str = "keep",
    once: bool = True,
    poll: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[Window]:
    """Process every complete window (and with ``once=False`` keep watching); return the windows written now.
    ``optimizer``: keep or reset Adam's moments in the written checkpoints (module docstring)."""
    from driftmerge.io.rundirs import scan

    if every < 1 or jump < 0:
        raise InputError(f"--every must be at least 1 and --jump 0 or more, got {every} and {jump}")
    if optimizer not in OPTIMIZER_STATE:
        raise InputError(f"--optimizer must be {' or '.join(OPTIMIZER_STATE)}, got {optimizer!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    how = _How(every, jump, rank, fit, optimizer, Path(out) if out is not None else run_dir / "driftmerge-reground")
    state = _load_state(how.out, every, jump)
    written: list[Window] = []
    warned: set[str] = set()  # each skipped folder is named once, not at every look
    while True:
        models, skipped = scan(run_dir)
        for skip in skipped:
            if skip.name not in warned:
                warned.add(skip.name)
                log(f"{skip.name}: {skip.reason}; skipped")
        found = {f.step: f.path for f in models}
        window = _next_window(state, found, every, jump, base is not None, base_step)
        if window is None:
            if once:
                return written
            time.sleep(poll)
            continue
        start = _start_path(window.start, state, found, base, base_step, how.out)
        steps = sorted(s for s in found if window.start < s <= window.end)
        log(f"window {window.start}..{window.end}: {len(steps)} checkpoints -> {how.out / window.folder}")
        _write_window(start, {s: found[s] for s in steps}, window, how)
        state["windows"].append(vars(window))
        how.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(how.out / STATE, json.dumps(state, indent=2) + "\n", overwrite=True, what="the loop's state")
        written.append(window)


@dataclass(frozen=True)
class _How:
    every: int
    jump: int
    rank: int | float
    fit: Fit
    optimizer: str
    out: Path


def _load_state(out: Path, every: int, jump: int) -> dict[str, Any]:
    path = out / STATE
    if not path.is_file():
        return {"every": every, "jump": jump, "windows": []}
    state = json.loads(path.read_text())
    if (state.get("every"), state.get("jump")) != (every, jump):
        raise InputError(
            f"{path}: this run was re-grounded with --every {state.get('every')} --jump {state.get('jump')}; use"
            " those, or another --output"
        )
    return state


def _next_window(
    state: dict[str, Any], found: dict[int, Path], every: int, jump: int, has_base: bool, base_step: int
) -> Window | None:
    if state["windows"]:
        start = state["windows"][-1]["output"]
    elif has_base:
        start = base_step
    elif found:
        start = min(found)
    else:
        return None
    end = start + every
    if end not in found:  # the window is not complete yet
        return None
    return Window(start, end, end + jump)


def _start_path(
    step: int, state: dict[str, Any], found: dict[int, Path], base: str | Path | None, base_step: int, out: Path
) -> str | Path:
    if any(w["output"] == step for w in state["windows"]):
        return out / checkpoint_name(step)  # the previous jump: where training resumed
    if base is not None and step == base_step:
        return base  # a folder, or a Hub id (extract resolves it; a Path would never be read as one)
    return found[step]


def _write_window(start: str | Path, cks: dict[int, Path], window: Window, how: _How) -> None:
    """Fit the window over ``start`` and ``cks`` (by step), write the model ``jump`` steps ahead as a resumable
    checkpoint: into a temporary sibling first, renamed into place once complete."""
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.extract import ExtractOptions, extract
    from driftmerge.commands.options import ApplyOptions

    end = cks[window.end]
    _check_full_models(end)
    adapter = how.out / f"drift_{window.start}-{window.end}"
    options = ExtractOptions(steps=[s - window.start for s in cks], base_step=0, rank=how.rank, fit=how.fit)
    extract(start, list(cks.values()), out_dir=adapter, options=options, overwrite=True)
    final, tmp = how.out / window.folder, how.out / f".{window.folder}.tmp"
    apply_drift(adapter, tmp, options=ApplyOptions(scale=(how.every + how.jump) / how.every), overwrite=True)
    resumable(end, tmp, step=window.output, optimizer=how.optimizer)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _check_full_models(end: Path) -> None:
    from driftmerge.io.lora_run import is_adapter_checkpoint

    if is_adapter_checkpoint(end):
        raise InputError(
            f"{end}: a LoRA (PEFT adapter) checkpoint; reground writes full models, which the adapter trainer cannot"
            " resume from (use DriftExtrapolationCallback inside the trainer instead)"
        )


def resumable(end: str | Path, folder: str | Path, *, step: int, optimizer: str = "keep") -> None:
    """Add to the model ``folder`` what a Trainer resumes from at ``step``, taken from the window's end checkpoint
    ``end`` (module docstring): trainer state, optimizer (kept or reset), scheduler moved on, RNG states."""
    import torch

    end, folder = Path(end), Path(folder)
    state: dict[str, Any] = json.loads((end / TRAINER_STATE).read_text()) if (end / TRAINER_STATE).is_file() else {}
    was = state.get("global_step")
    if isinstance(was, int) and was > 0 and isinstance(state.get("epoch"), (int, float)):
        state["epoch"] = state["epoch"] * step / was  # epochs grow in proportion to steps
    state["global_step"] = step
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    if (end / OPTIMIZER).is_file():
        if optimizer == "keep":
            shutil.copy2(end / OPTIMIZER, folder / OPTIMIZER)
        else:
            saved = torch.load(end / OPTIMIZER, map_location="cpu", weights_only=True)
            torch.save({**saved, "state": {}}, folder / OPTIMIZER)
    if (end / SCHEDULER).is_file():
        sched = torch.load(end / SCHEDULER, map_location="cpu", weights_only=True)
        moved = step - (was if isinstance(was, int) else step)
        for key in ("last_epoch", "_step_count"):
            if isinstance(sched, dict) and isinstance(sched.get(key), int):
                sched[key] += moved
        torch.save(sched, folder / SCHEDULER)
    for pattern in COPIED:
        for f in end.glob(pattern):
            shutil.copy2(f, folder / f.name)
