"""Periodic re-grounding on live weights: train M steps, jump N steps ahead along the fitted line, resume.

Every ``every`` (M) optimizer steps, :class:`Regrounder` fits the drift of the window that just ended with the same
math as ``extract`` — the line through the window's start and ``window`` (K) evenly spaced snapshots at
``t = M/K, 2M/K, …, M`` (``lsq``, ``pca`` or ``endpoint``), each 2-D weight (and each expert of a 3-D MoE
stack) factorized at ``rank`` (None: full rank), 1-D tensors full rank — and sets every trainable parameter to

    W = W_start + scale · D,   scale = (M + N) / M   (or the ``scale`` given),

i.e. ``apply --scale`` on that window's adapter: where the line says training would be N steps later. The next
window starts from there. Memory: the window's start (one copy of the trainable weights, in their dtype) and the
fit's running sums (two float32 copies; ``pca`` keeps every snapshot's delta instead), on ``snapshot_device``.

LoRA factors (``lora``: module → the names of its ``A`` ``(r, n)`` and ``B`` ``(m, r)``) move as a product: the
module's update ``ΔW = s B A`` is what follows a line, not A and B one by one. With the snapshots' factors
``(B_i, A_i)`` and the window start's ``(B_0, A_0)``, the deltas ``Δ_i = B_i A_i - B_0 A_0`` are fitted in low-rank
form (:func:`driftmerge.core.factored.fit_factored`: ``D = U V``, exact, never dense; the constant scaling ``s``
factors out), the target ``B_0 A_0 + scale · U V`` is truncated to the module's rank r by an exact SVD of the
stacked product (:func:`driftmerge.core.factored.factor_product`) and split balanced, ``B = U_r √S_r``,
``A = √S_r V_rᵀ``. Memory: the K snapshots' factors in float32 (the adapter's size each). Other trainable
parameters of a PEFT model (``modules_to_save`` copies, biases, DoRA magnitudes) move as dense tensors.

``energy_kept`` of a :class:`Jump` pools the share of ``‖·‖²`` kept over the 2-D tensors: of the drift ``D`` for a
dense weight factorized at ``rank``, of the target update ``B_0 A_0 + scale · D`` at the module's rank for LoRA.
:meth:`Regrounder.state_dict` / :meth:`Regrounder.load_state_dict` carry a window across a restart.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from driftmerge.core.drift import moved
from driftmerge.core.factored import factor_product, fit_factored
from driftmerge.core.lowrank import factorize, matrix_seed
from driftmerge.core.sums import sq_norm
from driftmerge.core.trajectory import LineAccumulator

OPTIMIZER_STATE = ("keep", "reset")
STATE_FORMAT = 1


@dataclass
class Jump:
    step: int  # the optimizer step at which the model moved
    scale: float
    median_r2: float | None  # over the tensors (LoRA: the modules), as extract's summary
    energy_kept: float  # share of the 2-D energy the rank-r factors keep (1.0 at full rank; module docstring)
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
        lora: Mapping[str, tuple[str, str]] | None = None,
    ):
        self.params, self.every, self.window = params, every, window
        self.scale = jump_scale(every, jump, scale=scale, window=window)
        self.fit, self.rank, self.seed, self.factor_dtype = fit, rank, seed, factor_dtype
        self.device = torch.device(snapshot_device)
        self.t = [float(every // window * (k + 1)) for k in range(window)]  # snapshot steps within a window
        self.lora = dict(lora or {})  # module -> (A's name, B's name)
        factors = [n for pair in self.lora.values() for n in pair]
        if unknown := sorted(set(factors) - params.keys()):
            raise ValueError(f"LoRA factors {', '.join(unknown)} are not among the trainable parameters")
        self.dense = [n for n in params if n not in set(factors)]
        self.origin = 0
        self.jumps: list[Jump] = []

    @torch.no_grad()
    def start(self, step: int) -> None:
        """Open a window at optimizer step ``step`` with the current weights as its start."""
        self.origin = step
        self.w_start = {n: p.detach().to(self.device, copy=True) for n, p in self.params.items()}
        self.acc = {n: LineAccumulator(self.t, self.fit) for n in self.dense}
        self.snaps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in self.lora}  # (B_i, A_i)

    @torch.no_grad()
    def step(self, step: int) -> Jump | None:
        """After optimizer step ``step``: take a snapshot when one is due, jump at the window's end."""
        k = step - self.origin
        if k <= 0 or k % (self.every // self.window):
            return None
        for n in self.dense:  # delta of this snapshot, handed to the fit (which owns it)
            self.acc[n].add(self.params[n].detach().to(self.device).float() - self.w_start[n].float())
        for m, (a, b) in self.lora.items():
            self.snaps[m].append((self._factor(b), self._factor(a)))
        if k < self.every:
            return None
        jump = self._jump(step)
        self.jumps.append(jump)
        self.start(step)
        return jump

    def _factor(self, name: str) -> torch.Tensor:
        return self.params[name].detach().to(self.device, dtype=torch.float32, copy=True)

    def _jump(self, step: int) -> Jump:
        r2s: list[float] = []
        kept = total = 0.0
        for n in self.dense:
            r2, k, t = self._move_dense(n)
            r2s += [] if r2 is None else [r2]
            kept, total = kept + k, total + t
        for m in self.lora:
            r2, k, t = self._move_lora(m)
            r2s += [] if r2 is None else [r2]
            kept, total = kept + k, total + t
        energy = kept / total if total > 0 else 1.0
        median = statistics.median(r2s) if r2s else None
        return Jump(step, self.scale, median, min(energy, 1.0), len(self.params))

    def _move_dense(self, n: str) -> tuple[float | None, float, float]:
        """``W = W_start + scale · D`` for one tensor; (its R², energy kept, energy) of the 2-D drift."""
        p = self.params[n]
        fit = self.acc[n].finish()
        drift = fit.drift
        kept = total = 0.0
        if drift.dim() in (2, 3):  # extract's LoRA tensors, and MoE expert stacks one expert at a time
            mats = [drift] if drift.dim() == 2 else list(drift.unbind(0))  # (m, n) each
            sqs = [fit.drift_sq_norm] if drift.dim() == 2 else [sq_norm(m) for m in mats]  # as extract has them
            total = sum(sqs)
            if self.rank is not None and total > 0.0:
                fs = factorize(
                    mats,
                    self.rank,
                    seeds=[matrix_seed(self.seed, n if len(mats) == 1 else f"{n}[{e}]") for e in range(len(mats))],
                    method="randomized",
                    compute_dtype=self.factor_dtype,
                    sq_norms=sqs,
                )
                low = [f.B @ f.A for f in fs]  # (m, n) each, the weight's own layout
                drift = low[0] if drift.dim() == 2 else torch.stack(low)
                kept = sum(f.energy * sq for f, sq in zip(fs, sqs, strict=True))
            else:
                kept = total
        p.copy_(moved(self.w_start[n], drift, scale=self.scale, dtype=p.dtype).to(p.device))
        return fit.r2, kept, total

    def _move_lora(self, m: str) -> tuple[float | None, float, float]:
        """``B A = truncate_r(B_0 A_0 + scale · D)`` for one LoRA module; (R², energy kept, energy) of the target."""
        a_name, b_name = self.lora[m]
        a, b = self.params[a_name], self.params[b_name]  # (r, n), (m, r)
        a0, b0 = self.w_start[a_name].float(), self.w_start[b_name].float()
        fit = fit_factored(
            [torch.cat([bi, -b0], dim=1) for bi, _ in self.snaps[m]],  # Δ_i = [B_i, -B_0] [A_i; A_0]
            [torch.cat([ai, a0], dim=0) for _, ai in self.snaps[m]],
            t=self.t,
            fit=self.fit,
        )
        u = torch.cat([b0, self.scale * fit.U], dim=1).double()  # the target B_0 A_0 + scale · U V = u v
        v = torch.cat([a0, fit.V], dim=0).double()
        total = max(float(((u.T @ u) * (v @ v.T)).sum()), 0.0)  # ‖u v‖² = Σ (uᵀu) ∘ (v vᵀ)
        r = a.shape[0]
        f = factor_product(u, v, rule=r)
        new_b = torch.zeros(b.shape, dtype=torch.float32)
        new_a = a.detach().to("cpu", torch.float32, copy=True)  # below rank r: zero columns of B, A's rows kept
        new_b[:, : f.rank], new_a[: f.rank] = f.B, f.A
        b.copy_(new_b.to(b.device, b.dtype))
        a.copy_(new_a.to(a.device, a.dtype))
        return fit.r2, f.energy * total, total

    def state_dict(self) -> dict[str, Any]:
        """The open window (its origin, start, the fit's running sums or snapshots) and the jumps so far, for
        ``torch.save``; :meth:`load_state_dict` takes it back."""
        return {
            "format": STATE_FORMAT,
            "settings": self._settings(),
            "origin": self.origin,
            "w_start": self.w_start,
            "fits": {n: dict(vars(acc)) for n, acc in self.acc.items()},  # the accumulator's sums, as they are
            "snapshots": {m: [list(pair) for pair in snaps] for m, snaps in self.snaps.items()},
            "jumps": [dataclasses.asdict(j) for j in self.jumps],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the window of :meth:`state_dict` (same settings and parameters, or ValueError)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown re-grounding state format {state.get('format')!r}")
        if state["settings"] != self._settings():
            raise ValueError(f"saved with the settings {state['settings']}, now {self._settings()}: resume with those")
        names, want = set(state["w_start"]), set(self.params)
        if names != want or set(state["snapshots"]) != set(self.lora):
            raise ValueError(f"saved for other trainable parameters ({len(names)} saved, {len(want)} now)")
        if bad := [n for n, p in self.params.items() if state["w_start"][n].shape != p.shape]:
            raise ValueError(f"saved for other shapes: {', '.join(bad[:3])}")
        self.origin = int(state["origin"])
        self.w_start = {n: w.to(self.device) for n, w in state["w_start"].items()}
        self.acc = {}
        for n, saved in state["fits"].items():
            acc = LineAccumulator(self.t, self.fit)
            vars(acc).update({k: _to(v, self.device) for k, v in saved.items()})
            self.acc[n] = acc
        self.snaps = {m: [(b.to(self.device), a.to(self.device)) for b, a in s] for m, s in state["snapshots"].items()}
        self.jumps = [Jump(**j) for j in state["jumps"]]

    def _settings(self) -> dict[str, Any]:
        return {"every": self.every, "window": self.window, "scale": self.scale, "fit": self.fit, "rank": self.rank}


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def reset_moments(optimizer: Any, params: list[torch.nn.Parameter]) -> None:
    """Forget the optimizer's per-parameter state (Adam's moments and step) for ``params``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for p in params:
        if p in inner.state:
            inner.state[p] = {}
