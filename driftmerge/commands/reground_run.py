"""Re-grounding for frameworks driven from the shell (verl, OpenRLHF): watch a run folder, and whenever a window of
``every`` (M) steps is complete, write the model ``jump`` (N) steps ahead along its fitted line as a Hugging Face
checkpoint for the next training stage to resume from.

Windows: the first starts at the base (``base``, step ``base_step``) or, without one, at the first checkpoint;
a window from step s ends at s + M once the checkpoint of step s + M exists, and is fitted with ``extract`` over
its start and the run's checkpoints in (s, s + M]; the result ``apply --scale (M + N) / M`` is written to
``OUT/step_<s + M + N>``, which is where the next window starts (training is expected to resume there and save
its checkpoints under their own steps). ``OUT/reground.json`` records the windows done, so the loop can be
stopped and started again; each window's adapter stays in ``OUT/drift_<s>-<s + M>`` for inspection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftmerge.core.trajectory import Fit
from driftmerge.errors import InputError

STATE = "reground.json"


@dataclass
class Window:
    start: int
    end: int
    output: int  # step of the extrapolated checkpoint: end + jump

    @property
    def folder(self) -> str:
        return f"step_{self.output}"


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
    once: bool = True,
    poll: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[Window]:
    """Process every complete window (and with ``once=False`` keep watching); return the windows written now."""
    from driftmerge.io.rundirs import discover

    if every < 1 or jump < 0:
        raise InputError(f"--every must be at least 1 and --jump 0 or more, got {every} and {jump}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    out = Path(out) if out is not None else run_dir / "driftmerge-reground"
    state = _load_state(out, every, jump)
    written: list[Window] = []
    while True:
        found = {f.step: f.path for f in discover(run_dir)}
        window = _next_window(state, found, every, jump, base is not None, base_step)
        if window is None:
            if once:
                return written
            time.sleep(poll)
            continue
        start = _start_path(window.start, state, found, base, base_step, out)
        steps = sorted(s for s in found if window.start < s <= window.end)
        log(f"window {window.start}..{window.end}: {len(steps)} checkpoints -> {out / window.folder}")
        _write_window(
            start, [found[s] for s in steps], [s - window.start for s in steps], window, every, jump, rank, fit, out
        )
        state["windows"].append(vars(window))
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE).write_text(json.dumps(state, indent=2) + "\n")
        written.append(window)


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
) -> Path:
    if any(w["output"] == step for w in state["windows"]):
        return out / f"step_{step}"  # the previous jump: where training resumed
    if base is not None and step == base_step:
        return Path(base)
    return found[step]


def _write_window(
    start: Path,
    cks: list[Path],
    steps: list[int],
    window: Window,
    every: int,
    jump: int,
    rank: int | float,
    fit: Fit,
    out: Path,
) -> None:
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.extract import ExtractOptions, extract
    from driftmerge.commands.options import ApplyOptions

    adapter = out / f"drift_{window.start}-{window.end}"
    extract(
        start,
        cks,
        out_dir=adapter,
        options=ExtractOptions(steps=steps, base_step=0, rank=rank, fit=fit),
        overwrite=True,
    )
    apply_drift(adapter, out / window.folder, options=ApplyOptions(scale=(every + jump) / every), overwrite=True)
