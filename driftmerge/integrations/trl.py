"""Periodic re-grounding inside a ``transformers`` / TRL trainer (``GRPOTrainer`` in particular).

    from driftmerge.integrations.trl import DriftExtrapolationCallback

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=..., peft_config=...)
    DriftExtrapolationCallback(every=50, jump=50, window=5, rank=1).attach(trainer)
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)

Every ``every`` optimizer steps the callback fits the drift of the window that just ended over ``window`` in-memory
snapshots of the trainable weights (``extract``'s math, no disk round trip; see :mod:`driftmerge.core.reground`) and
moves the live model ``jump`` steps ahead along it (or to ``scale`` times the window's drift); training resumes from
there. Under LoRA (a PEFT model whose ``lora_A`` / ``lora_B`` train) each module's product ``s B A`` moves along its
line and is refactored at the module's rank (:func:`lora_pairs`; the other trainable tensors move as they are).

Logging. The callback never calls ``trainer.log`` (a second log inside a step resets ``control.should_log``, so the
trainer's own entry of that step — loss, grad_norm, learning_rate — was lost, and GRPO's averaged metrics were
flushed into the extra entry). It adds its metrics to the trainer's own entries instead, once each: at a jump step
it asks the trainer to log (``control.should_log``, also between ``logging_steps``), and its ``on_log`` merges
``drift/scale``, ``drift/median_r2``, ``drift/energy_kept``, ``drift/tensors`` and ``drift/reward_before`` into that
step's entry (the ``logs`` dict the reporters receive, and the entry in ``state.log_history``); ``drift/reward_after``
joins the first training entry once it is known. :meth:`attach` puts the callback first in the trainer's list so
that its ``on_log`` runs before the reporters' (W&B, TensorBoard, …); passed as ``callbacks=[…]`` it runs after
them, and only ``state.log_history`` and later callbacks see the drift metrics.

Rewards. GRPOTrainer (and RLOOTrainer) append the mean reward of every generated batch to
``trainer._metrics["train"]["reward"]`` while they generate (in ``training_step``, before the optimizer step) and
average and clear that list when they log. The callback reads the list after every optimizer step (``on_step_end``
runs before the trainer's log), so it knows each batch's reward: ``drift/reward_before`` is the reward of the last
batch generated before the jump (the window's last), ``drift/reward_after`` that of the first batch generated after
it (with the jumped weights; with ``steps_per_generation`` > gradient accumulation a later step's). Needs
:meth:`attach` (a callback is not given the trainer) and a trainer that keeps that list; otherwise no reward metric.

Resuming. On every checkpoint save (``on_save``: ``Trainer._save_checkpoint`` has just written
``args.output_dir/checkpoint-<step>``) the main process writes :data:`STATE_FILE` there: the open window (origin,
start weights, the fit's running sums, LoRA snapshots), the jumps so far and the pending metrics. When
``train(resume_from_checkpoint=…)`` resumes, the trainer restores ``state`` from the checkpoint's
``trainer_state.json`` before ``on_train_begin``, so ``state.global_step > 0`` there; the callback loads the file
from ``args.resume_from_checkpoint`` when set, else from ``args.output_dir/checkpoint-<global_step>`` (where the
trainer saved it, and what ``resume_from_checkpoint=True`` picks), and jumps at the steps an uninterrupted run would.
Without the file (or when the weights are not the ones saved with it: another run's checkpoint of the same step)
it warns and opens a new window at the resumed step. (transformers' ``ExportableState`` is not used: its restore
re-creates the callback, which would drop :meth:`attach`'s trainer, and tensors do not belong in
``trainer_state.json``.) ``trainer.save_model`` alone writes no trainer state, so nothing resumes from it.

``optimizer``: ``"keep"`` (default) leaves Adam's moments as they were before the jump; ``"reset"`` forgets them for
the moved parameters (the optimizer re-initializes them at the next step). The choice changes results; the seed
paper's shell loop restarted training from the extrapolated checkpoint, which resets them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from driftmerge.core.reground import OPTIMIZER_STATE, Jump, Regrounder, jump_scale, reset_moments
from driftmerge.errors import InputError

logger = logging.getLogger("driftmerge")

STATE_FILE = "driftmerge_reground.pt"  # in each checkpoint folder


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
        self.pending: dict[str, float] = {}  # drift metrics for the trainer's next own log entry
        self._last_reward: float | None = None  # of the last batch generated so far
        self._awaiting_reward = False  # a jump happened and no batch was generated since
        self._rewards_read: tuple[list, int] | None = None  # the trainer's reward list, and how much of it was read

    @property
    def jumps(self) -> list[Jump]:
        """The jumps so far (a resumed run includes those before the checkpoint)."""
        return self.regrounder.jumps if self.regrounder is not None else []

    def attach(self, trainer: Any) -> DriftExtrapolationCallback:
        """Add to ``trainer`` as its first callback (so reporters see the drift metrics) and read its rewards."""
        trainer.callback_handler.callbacks.insert(0, self)
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.regrounder = self._regrounder(params, lora=lora_pairs(model))
        self.pending, self._last_reward, self._awaiting_reward, self._rewards_read = {}, None, False, None
        if state.global_step > 0 and self._resume(args, state):
            return
        self.regrounder.start(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        assert self.regrounder is not None, "on_train_begin was not called"
        self._read_rewards()  # the batches generated for this step, by the weights before it
        jump = self.regrounder.step(state.global_step)
        if jump is None:
            return
        if self.optimizer == "reset" and optimizer is not None:
            reset_moments(optimizer, list(self.regrounder.params.values()))
        self.pending.update(
            {"drift/scale": jump.scale, "drift/energy_kept": jump.energy_kept, "drift/tensors": jump.tensors}
        )
        if jump.median_r2 is not None:
            self.pending["drift/median_r2"] = jump.median_r2
        if self._last_reward is not None:
            self.pending["drift/reward_before"] = self._last_reward
        self._awaiting_reward = True
        control.should_log = True  # the trainer's own entry of this step carries the jump's metrics
        logger.info(
            "step %d: moved %d tensors to scale %.3f of the window's drift", jump.step, jump.tensors, jump.scale
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not self.pending or logs is None or "loss" not in logs:  # only the trainer's training-step entries
            return
        logs.update(self.pending)  # the dict every later callback (the reporters, after attach) receives
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "loss" in last:  # Trainer.log appended it just before
            last.update(self.pending)
        self.pending = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.regrounder is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            logger.warning("%s: no such checkpoint folder; the re-grounding window is not saved", folder)
            return
        mine = {"pending": self.pending, "last_reward": self._last_reward, "awaiting_reward": self._awaiting_reward}
        where = {"step": state.global_step, "weights": _fingerprint(self.regrounder.params)}
        torch.save({**where, "regrounder": self.regrounder.state_dict(), **mine}, folder / STATE_FILE)

    def _resume(self, args: Any, state: Any) -> bool:
        assert self.regrounder is not None
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        path = next((Path(c) / STATE_FILE for c in candidates if (Path(c) / STATE_FILE).is_file()), None)
        if path is None:
            logger.warning(
                "resumed at step %d without %s in %s: the first window starts there",
                state.global_step, STATE_FILE, " or ".join(candidates),
            )  # fmt: skip
            return False
        saved = torch.load(path, map_location=self.regrounder.device, weights_only=True)
        if saved["step"] != state.global_step:
            raise InputError(f"{path}: saved at step {saved['step']}, but training resumes at {state.global_step}")
        if not math.isclose(saved["weights"], _fingerprint(self.regrounder.params), rel_tol=1e-6):
            logger.warning("%s: saved with other weights than those resumed; the first window starts there", path)
            return False
        try:
            self.regrounder.load_state_dict(saved["regrounder"])
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
        self.pending, self._last_reward = dict(saved["pending"]), saved["last_reward"]
        self._awaiting_reward = saved["awaiting_reward"]
        return True

    def _read_rewards(self) -> None:
        """Take the rewards the trainer appended since the last call (module doc, Rewards)."""
        metrics = getattr(self.trainer, "_metrics", None)
        rewards = metrics.get("train", {}).get("reward") if isinstance(metrics, dict) else None
        if not isinstance(rewards, list):
            return
        seen, count = self._rewards_read or (None, 0)
        new = rewards[count:] if rewards is seen else rewards  # a new list after the trainer's log cleared it
        self._rewards_read = (rewards, len(rewards))
        values = [float(v) for v in new if v is not None and not math.isnan(v)]
        if not values:
            return
        if self._awaiting_reward:
            self.pending["drift/reward_after"] = values[0]
            self._awaiting_reward = False
        self._last_reward = values[-1]


def _fingerprint(params: dict[str, torch.nn.Parameter]) -> float:
    """``Σ ‖p‖²`` over the trainable tensors (float64): tells the checkpoint's weights from another run's."""
    return sum(float(p.detach().double().pow(2).sum()) for p in params.values())


def lora_pairs(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """The trainable LoRA factors of a PEFT model: ``"<module>.<adapter>"`` → (``lora_A``'s name, ``lora_B``'s), for
    every module with 2-D ``lora_A[adapter].weight`` ``(r, n)`` and ``lora_B[adapter].weight`` ``(m, r)`` (linear and
    Conv1D layers; embedding and convolution LoRA, DoRA magnitudes and biases move as plain tensors)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    pairs = {}
    for path, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for adapter in lora_a.keys() & lora_b.keys():
            a, b = getattr(lora_a[adapter], "weight", None), getattr(lora_b[adapter], "weight", None)
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or id(a) not in names or id(b) not in names:
                continue
            pairs[f"{path}.{adapter}"] = (names[id(a)], names[id(b)])
    return pairs


def snapshot_bytes(model: torch.nn.Module, fit: str = "lsq", *, window: int = 4) -> int:
    """Memory the callback holds on ``snapshot_device``: the window's start in the weights' dtype plus the fit's
    float32 buffers (two running sums; endpoint also keeps the last delta, pca every one of the ``window``); LoRA
    factors keep ``window`` float32 snapshots instead of the buffers."""
    factors = {n for pair in lora_pairs(model).values() for n in pair}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = sum(p.numel() * p.element_size() for _, p in named)
    buffers = 2 + {"lsq": 0, "endpoint": 1, "pca": window}[fit]
    dense = sum(p.numel() for n, p in named if n not in factors)
    lora = sum(p.numel() for n, p in named if n in factors)
    return start + dense * 4 * buffers + lora * 4 * window
