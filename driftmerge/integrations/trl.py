"""Periodic re-grounding inside a ``transformers`` / TRL trainer (``GRPOTrainer`` in particular).

    from driftmerge.integrations.trl import DriftExtrapolationCallback

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    DriftExtrapolationCallback(every=50, jump=50, window=5, rank=1).attach(trainer)
    trainer.train()

Every ``every`` optimizer steps the callback fits the drift of the window that just ended over ``window`` in-memory
snapshots of the trainable weights (``extract``'s math, no disk round trip; see :mod:`driftmerge.core.reground`) and
moves the live model ``jump`` steps ahead along it (or to ``scale`` times the window's drift); training resumes from
there.
It logs ``drift/scale``, ``drift/median_r2``, ``drift/energy_kept`` and, when the trainer logs a reward (any key
ending in ``reward``), ``drift/reward_before`` and then ``drift/reward_after`` through the trainer's own logging.

``optimizer``: ``"keep"`` (default) leaves Adam's moments as they were before the jump; ``"reset"`` forgets them for
the moved parameters (the optimizer re-initializes them at the next step). The choice changes results; the seed
paper's shell loop restarted training from the extrapolated checkpoint, which resets them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from driftmerge.core.reground import OPTIMIZER_STATE, Jump, Regrounder, jump_scale, reset_moments

logger = logging.getLogger("driftmerge")


class DriftExtrapolationCallback(TrainerCallback):
    """Fit the drift every ``every`` optimizer steps and jump ``jump`` steps ahead along it (see module doc)."""

    def __init__(
        self,
        every: int,
        jump: int | None = None,
        scale: float | None = None,
        window: int = 4,
        fit: str = "lsq",
        rank: int | float | None = None,
        optimizer: str = "keep",
        seed: int = 0,
        snapshot_device: str = "cpu",
    ):
        if optimizer not in OPTIMIZER_STATE:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE)}, got {optimizer!r}")
        jump_scale(every, jump, scale=scale, window=window)  # fail at construction, not at the first training step
        self._regrounder = functools.partial(
            Regrounder,
            every=every,
            jump=jump,
            scale=scale,
            window=window,
            fit=fit,
            rank=rank,
            seed=seed,
            snapshot_device=snapshot_device,
        )  # built on the trainer's parameters at on_train_begin
        self.optimizer = optimizer
        self.trainer: Any = None
        self.regrounder: Regrounder | None = None
        self.jumps: list[Jump] = []
        self._last_reward: float | None = None
        self._awaiting_reward = False

    def attach(self, trainer: Any) -> DriftExtrapolationCallback:
        """Add to ``trainer`` and log through ``trainer.log`` (so every reporter sees the jumps)."""
        trainer.add_callback(self)
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.regrounder = self._regrounder(params)
        self.regrounder.start(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        assert self.regrounder is not None, "on_train_begin was not called"
        jump = self.regrounder.step(state.global_step)
        if jump is None:
            return
        if self.optimizer == "reset" and optimizer is not None:
            reset_moments(optimizer, list(self.regrounder.params.values()))
        self.jumps.append(jump)
        logs = {"drift/scale": jump.scale, "drift/energy_kept": jump.energy_kept, "drift/tensors": jump.tensors}
        if jump.median_r2 is not None:
            logs["drift/median_r2"] = jump.median_r2
        if self._last_reward is not None:
            logs["drift/reward_before"] = self._last_reward
        self._awaiting_reward = True
        self._log(state, logs)
        logger.info(
            "step %d: moved %d tensors to scale %.3f of the window's drift", jump.step, jump.tensors, jump.scale
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        reward = next((v for k, v in (logs or {}).items() if k.endswith("reward") and not k.startswith("drift/")), None)
        if reward is None:
            return
        self._last_reward = float(reward)
        if self._awaiting_reward:
            self._awaiting_reward = False
            self._log(state, {"drift/reward_after": float(reward)})

    def _log(self, state: Any, logs: dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(logs)
        else:  # not attached: keep it in the trainer state's history at least
            state.log_history.append({**logs, "step": state.global_step})


def snapshot_bytes(model: torch.nn.Module, fit: str = "lsq", *, window: int = 4) -> int:
    """Memory the callback holds on ``snapshot_device``: the window's start in the weights' dtype plus the fit's
    float32 buffers (two running sums; endpoint also keeps the last delta, pca every one of the ``window``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = sum(p.numel() * p.element_size() for p in params)
    buffers = 2 + {"lsq": 0, "endpoint": 1, "pca": window}[fit]
    return start + sum(p.numel() for p in params) * 4 * buffers
