"""The re-grounding callback inside TRL's real ``GRPOTrainer`` (tests/grpo.py: a tiny Llama on the CPU, offline):
the trainer's own log entries stay whole and carry each drift metric once, the rewards around a jump come from the
batches generated before and after it, a resumed run jumps where an uninterrupted one does (same weights), and under
LoRA each module's product ``s B A`` moves along the line of the window's merged updates."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from grpo import digit_reward, lora_config, make_grpo_trainer, one_thread
from transformers import TrainerCallback

from driftmerge.integrations.trl import STATE_FILE, DriftExtrapolationCallback

M, K, N = 4, 2, 4  # every 4 steps, snapshots at 2 and 4, jump 4 steps ahead: scale (4 + 4) / 4 = 2
JUMP_KEYS = ("drift/scale", "drift/energy_kept", "drift/tensors", "drift/median_r2", "drift/reward_before")


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():  # the tiny model: threads cost more than they give
        yield


class Events(TrainerCallback):
    """The order of what happens: ``("reward", mean)`` for each batch TRL scores (as its reward function), and
    ``("end", step)`` after each optimizer step (registered after the callback under test: after any jump)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def reward(self, completions, **kwargs):  # type: ignore[no-untyped-def]
        values = digit_reward(completions)
        self.events.append(("reward", sum(values) / len(values)))
        return values

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.events.append(("end", state.global_step))

    def scored(self) -> list[tuple[int, float]]:
        """(the step whose end follows, mean reward) of every batch scored."""
        out, pending = [], []
        for kind, v in self.events:
            if kind == "reward":
                pending.append(v)
            else:
                out += [(int(v), r) for r in pending]
                pending = []
        return out

    def around(self, step: int) -> tuple[float, float, int]:
        """The reward of the last batch scored before the end of ``step``, of the first one after it, and the step
        whose end follows that first one."""
        i = self.events.index(("end", step))
        before = [v for kind, v in self.events[:i] if kind == "reward"][-1]
        j = next(k for k in range(i, len(self.events)) if self.events[k][0] == "reward")
        return before, self.events[j][1], int(next(v for kind, v in self.events[j:] if kind == "end"))


class Weights(TrainerCallback):
    """The trainable weights after every optimizer step (after any jump); stops training after ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.at = stop, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if state.global_step == self.stop:
            control.should_training_stop = True  # after this step's checkpoint is saved


@pytest.mark.parametrize(
    "overrides", [{}, {"logging_steps": 3, "steps_per_generation": 2}], ids=["log-every-step", "log-every-3"]
)
def test_the_trainers_entries_stay_whole_and_carry_each_drift_metric_once(tmp_path, overrides):
    events = Events()
    steps = 2 * M + 1
    trainer = make_grpo_trainer(
        tmp_path / "out", max_steps=steps, callbacks=[events], reward=events.reward, **overrides
    )
    cb = DriftExtrapolationCallback(every=M, jump=N, window=K).attach(trainer)
    trainer.train()
    assert [j.step for j in cb.jumps] == [M, 2 * M] and all(j.scale == 2.0 for j in cb.jumps)

    history = trainer.state.log_history
    entries, summary = history[:-1], history[-1]
    assert "train_runtime" in summary and not any(k.startswith("drift/") for k in summary)
    every = overrides.get("logging_steps", 1)
    # the trainer's own entries: at its logging steps, and at each jump step (the callback asks for one there)
    assert [e["step"] for e in entries] == sorted(set(range(every, steps + 1, every)) | {M, 2 * M})
    own = ("loss", "grad_norm", "learning_rate", "entropy", "clip_ratio/region_mean")  # GRPO's per-step metrics
    assert all(set(own) <= e.keys() for e in entries), [sorted(set(own) - e.keys()) for e in entries]
    # GRPO's reward: once per entry, the mean of the batches scored since the previous one (none: no reward)
    scored = events.scored()
    for prev, entry in zip([0] + [e["step"] for e in entries], entries, strict=False):
        batches = [r for s, r in scored if prev < s <= entry["step"]]
        assert ("reward" in entry) == bool(batches), entry["step"]
        if batches:
            assert entry["reward"] == pytest.approx(sum(batches) / len(batches), rel=1e-6)
    for key in JUMP_KEYS:
        assert [e["step"] for e in history if key in e] == [M, 2 * M], key

    # rewards: of the batch generated (and scored) last before the jump, and of the first one after it
    after_steps = []
    for jump in (M, 2 * M):
        before, after, known = events.around(jump)
        entry = next(e for e in entries if e["step"] == jump)
        assert entry["drift/reward_before"] == pytest.approx(before, rel=1e-6)
        late = next(e for e in entries if e["step"] >= known)  # the trainer's first entry once it is known
        assert late["drift/reward_after"] == pytest.approx(after, rel=1e-6)
        after_steps.append(late["step"])
    assert [e["step"] for e in history if "drift/reward_after" in e] == after_steps
    if every == 1:  # one batch per step: the jump step's own reward, and the next step's
        assert after_steps == [M + 1, 2 * M + 1]
        assert all(e["drift/reward_before"] == e["reward"] for e in entries if "drift/scale" in e)
        assert all(e["drift/reward_after"] == e["reward"] for e in entries if "drift/reward_after" in e)


def test_a_resumed_run_jumps_where_an_uninterrupted_one_does(tmp_path, caplog):
    def run(folder, recorder, resume=False, steps=2 * M + 1):  # type: ignore[no-untyped-def]
        trainer = make_grpo_trainer(tmp_path / folder, max_steps=steps, save_steps=6, callbacks=[recorder])
        cb = DriftExtrapolationCallback(every=M, jump=N, window=K).attach(trainer)
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer, cb

    whole, stopped, resumed = Weights(), Weights(stop=6), Weights()
    _, cb_whole = run("whole", whole)
    trainer, cb = run("run", stopped)
    assert trainer.state.global_step == 6 and [j.step for j in cb.jumps] == [M]
    assert (tmp_path / "run" / "checkpoint-6" / STATE_FILE).is_file()  # mid-window: one snapshot (step 6) taken
    trainer, cb = run("run", resumed, resume=True)
    assert [j.step for j in cb.jumps] == [j.step for j in cb_whole.jumps] == [M, 2 * M]
    for step in (2 * M, 2 * M + 1):  # right after the second jump, and one step later
        for name, want in whole.at[step].items():
            torch.testing.assert_close(resumed.at[step][name], want, rtol=0, atol=1e-6)
    history = trainer.state.log_history  # restored from the checkpoint, then continued
    for key in JUMP_KEYS:
        assert [e["step"] for e in history if key in e] == [M, 2 * M], key
    assert [e["step"] for e in history if "drift/reward_after" in e] == [M + 1, 2 * M + 1]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 2 * M + 2))

    # a checkpoint without the window's file: a warning, and the first window starts at the resumed step
    shutil.copytree(tmp_path / "run" / "checkpoint-6", tmp_path / "bare" / "checkpoint-6")
    (tmp_path / "bare" / "checkpoint-6" / STATE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="driftmerge"):
        _, cb = run("bare", Weights(), resume=True, steps=6 + M + 1)
    assert [j.step for j in cb.jumps] == [6 + M] and "the first window starts there" in caplog.text


def _merged(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Each LoRA module's merged update ``s B A``, as PEFT computes it, in float64."""
    return {
        name: module.get_delta_weight("default").detach().double()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


class Merged(TrainerCallback):
    """PEFT's merged updates (and the other trainable tensors) at the start and at every snapshot step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, step, model):  # type: ignore[no-untyped-def]
        dense = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.at[step] = {**_merged(model), **{n: w for n, w in dense.items() if "lora_" not in n}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self._take(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step % (M // K) == 0:
            self._take(state.global_step, model)


def test_under_lora_the_merged_update_moves_along_its_line(tmp_path):
    merged = Merged()
    trainer = make_grpo_trainer(tmp_path / "out", lora=lora_config(modules_to_save=["lm_head"]), max_steps=M)
    cb = DriftExtrapolationCallback(every=M, jump=N, window=K, rank=None).attach(trainer)
    trainer.callback_handler.callbacks.insert(0, merged)  # before the callback: the window's last snapshot, unjumped
    trainer.train()
    assert [j.step for j in cb.jumps] == [M]
    live = {**_merged(trainer.model), **{n: p.detach().double() for n, p in trainer.model.named_parameters()}}

    # the reference, dense: lsq line through the window's start, W = W_0 + 2 · t_ref Σ t_i (W_i - W_0) / Σ t_i²
    t = [M // K * (k + 1) for k in range(K)]
    w0 = merged.at[0]
    kept = total = 0.0
    lora_modules = [n for n in w0 if "lora_" not in n and n in _merged(trainer.model)]
    assert len(lora_modules) == 14  # 7 projections x 2 layers
    for name, start in w0.items():
        drift = t[-1] * sum(ti * (merged.at[ti][name] - start) for ti in t) / sum(ti * ti for ti in t)
        target = start + 2.0 * drift
        if name not in lora_modules:  # the lm_head copy (modules_to_save): a dense tensor, full rank
            torch.testing.assert_close(live[name], target, rtol=1e-5, atol=1e-6)
            kept, total = kept + float(drift.pow(2).sum()), total + float(drift.pow(2).sum())
            continue
        u, s, vh = torch.linalg.svd(target, full_matrices=False)  # the module's rank-r part of the target update
        r = 2
        torch.testing.assert_close(live[name], (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-6)
        kept, total = kept + float(s[:r].pow(2).sum()), total + float(s.pow(2).sum())
    assert cb.jumps[0].energy_kept == pytest.approx(kept / total, rel=1e-5) and cb.jumps[0].energy_kept < 1.0

    # balanced factors: Bᵀ B = A Aᵀ = S_r (diagonal)
    module = trainer.model.get_submodule(lora_modules[0])
    b, a = module.lora_B["default"].weight.detach().double(), module.lora_A["default"].weight.detach().double()
    torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(b.T @ b, torch.diag(torch.diagonal(b.T @ b)), rtol=0, atol=1e-6)
