"""Periodic re-grounding on live weights: train M steps, jump N steps ahead along the fitted line, resume.

Every ``every`` (M) optimizer steps, :class:`Regrounder` fits the drift of the window that just ended with the same
math as ``extract`` — the line through the window's start and ``window`` (K) evenly spaced snapshots at
``t = M/K, 2M/K, …, M`` (``lsq``, ``pca`` or ``endpoint``), each 2-D weight (and each expert of a 3-D MoE
stack) factorized at ``rank`` (None: full rank), 1-D tensors full rank — and sets every trainable parameter to

    W = W_start + scale · D,   scale = (M + N) / M   (or the ``scale`` given),

i.e. ``apply --scale`` on that window's adapter: where the line says training would be N steps later. The next
window starts from there. Memory: the window's start (one copy of the trainable weights, in their dtype) and the
fit's running sums (two float32 copies; ``pca`` keeps every snapshot's delta instead), on ``snapshot_device``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from driftmerge.core.drift import moved
from driftmerge.core.lowrank import factorize, matrix_seed
from driftmerge.core.trajectory import LineAccumulator

OPTIMIZER_STATE = ("keep", "reset")


@dataclass
class Jump:
    step: int  # the optimizer step at which the model moved
    scale: float
    median_r2: float | None  # over the tensors, as extract's summary
    energy_kept: float  # share of the 2-D drift energy the rank-r factors keep (1.0 at full rank)
    tensors: int  # parameters moved


def jump_scale(every: int, jump: int | None, *, scale: float | None, window: int) -> float:
    """The settings checked, and the scale of the window's drift to move to: ``(M + N) / M`` or ``scale``."""
    if every < 1 or window < 1 or every % window:
        raise ValueError(f"every ({every}) must be a positive multiple of window ({window})")
    if (jump is None) == (scale is None):
        raise ValueError("give exactly one of jump (steps ahead) or scale")
    if scale is not None:
        return scale
    assert jump is not None  # one of the two, checked above
    return (every + jump) / every


class Regrounder:
    """Re-grounding for any training loop: call :meth:`start` once, :meth:`step` after every optimizer step."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        every: int,
        jump: int | None = None,
        scale: float | None = None,
        window: int = 4,
        fit: str = "lsq",
        rank: int | float | None = None,
        seed: int = 0,
        factor_dtype: torch.dtype = torch.float32,
        snapshot_device: str | torch.device = "cpu",
    ):
        self.params, self.every, self.window = params, every, window
        self.scale = jump_scale(every, jump, scale=scale, window=window)
        self.fit, self.rank, self.seed, self.factor_dtype = fit, rank, seed, factor_dtype
        self.device = torch.device(snapshot_device)
        self.t = [float(every // window * (k + 1)) for k in range(window)]  # snapshot steps within a window
        self.origin = 0
        self.jumps: list[Jump] = []

    @torch.no_grad()
    def start(self, step: int) -> None:
        """Open a window at optimizer step ``step`` with the current weights as its start."""
        self.origin = step
        self.w_start = {n: p.detach().to(self.device, copy=True) for n, p in self.params.items()}
        self.acc = {n: LineAccumulator(self.t, self.fit) for n in self.params}

    @torch.no_grad()
    def step(self, step: int) -> Jump | None:
        """After optimizer step ``step``: take a snapshot when one is due, jump at the window's end."""
        k = step - self.origin
        if k <= 0 or k % (self.every // self.window):
            return None
        for n, p in self.params.items():  # delta of this snapshot, handed to the fit (which owns it)
            self.acc[n].add(p.detach().to(self.device).float() - self.w_start[n].float())
        if k < self.every:
            return None
        jump = self._jump(step)
        self.jumps.append(jump)
        self.start(step)
        return jump

    def _jump(self, step: int) -> Jump:
        r2s, kept, total = [], 0.0, 0.0
        for n, p in self.params.items():
            fit = self.acc[n].finish()
            drift = fit.drift
            if fit.r2 is not None:
                r2s.append(fit.r2)
            if drift.dim() in (2, 3):  # extract's LoRA tensors, and MoE expert stacks one expert at a time
                mats = [drift] if drift.dim() == 2 else list(drift.unbind(0))  # (m, n) each
                sqs = [float(m.pow(2).sum()) for m in mats]
                total += sum(sqs)
                if self.rank is not None and sum(sqs) > 0.0:
                    fs = factorize(
                        mats,
                        self.rank,
                        seeds=[matrix_seed(self.seed, n if len(mats) == 1 else f"{n}[{e}]") for e in range(len(mats))],
                        method="randomized",
                        niter=2,
                        oversample=8,
                        compute_dtype=self.factor_dtype,
                    )
                    low = [f.B @ f.A for f in fs]  # (m, n) each, the weight's own layout
                    drift = low[0] if drift.dim() == 2 else torch.stack(low)
                    kept += sum(f.energy * sq for f, sq in zip(fs, sqs, strict=True))
                else:
                    kept += sum(sqs)
            p.copy_(moved(self.w_start[n], drift, scale=self.scale, dtype=p.dtype).to(p.device))
        energy = kept / total if total > 0 else 1.0
        median = statistics.median(r2s) if r2s else None
        return Jump(step, self.scale, median, min(energy, 1.0), len(self.params))


def reset_moments(optimizer: Any, params: list[torch.nn.Parameter]) -> None:
    """Forget the optimizer's per-parameter state (Adam's moments and step) for ``params``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for p in params:
        if p in inner.state:
            inner.state[p] = {}
