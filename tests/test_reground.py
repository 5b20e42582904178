"""Re-grounding: the Trainer callback jumps at the right steps by exactly what extract + apply give on the same
snapshots, and training resumes; a window survives a restart; LoRA factors move as their product; the CLI loop
writes the extrapolated checkpoints of a run folder. (The callback inside TRL's GRPOTrainer: test_trl_callback.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error, load_weights
from synthetic import make_run, tiny_config

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions

M, K, N = 8, 4, 4  # every 8 steps, 4 snapshots, jump 4 steps ahead: scale (8 + 4) / 8 = 1.5


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 12, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, max_steps: int, callbacks=(), **kw):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    settings = {"save_strategy": "no", **kw}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **settings,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))


class Snapshots:
    """A test callback (registered before the one under test): saves the weights at the window's snapshot steps."""

    def __new__(cls, folder):  # type: ignore[no-untyped-def]
        from transformers import TrainerCallback

        class _Saver(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
                model.save_pretrained(folder / "checkpoint-0")

            def on_step_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
                if state.global_step % (M // K) == 0:
                    model.save_pretrained(folder / f"checkpoint-{state.global_step}")

        return _Saver()


@pytest.mark.parametrize("rank", [1, None])
def test_callback_moves_by_exactly_the_fitted_drift(tmp_path, rank):
    from driftmerge.integrations.trl import DriftExtrapolationCallback

    snaps = tmp_path / "snaps"
    cb = DriftExtrapolationCallback(every=M, jump=N, window=K, rank=rank)
    trainer = _trainer(tmp_path, max_steps=M)
    cb.attach(trainer)  # the callback goes first; the saver before it sees the window's last snapshot unjumped
    trainer.callback_handler.callbacks.insert(0, Snapshots(snaps))
    trainer.train()
    assert [j.step for j in cb.jumps] == [M] and cb.jumps[0].scale == 1.5
    live = {n: p.detach() for n, p in trainer.model.named_parameters()}

    # the same window through extract + apply on the saved snapshots
    steps = [M // K * (k + 1) for k in range(K)]
    cks = [snaps / f"checkpoint-{s}" for s in steps]
    if rank is not None:
        extract(
            snaps / "checkpoint-0",
            cks,
            out_dir=tmp_path / "adapter",
            options=ExtractOptions(rank=rank, factor_dtype="float32"),
        )
        apply_drift(tmp_path / "adapter", tmp_path / "model", options=ApplyOptions(scale=1.5))
        want = load_weights(tmp_path / "model")
        assert all(torch.equal(live[n], want[n]) for n in live), [n for n in live if not torch.equal(live[n], want[n])]
    else:  # full rank: the least-squares line through the start, W = W0 + 1.5 · t_ref Σ t_i D_i / Σ t_i²
        w0 = load_weights(snaps / "checkpoint-0")
        ws = [load_weights(c) for c in cks]
        t = torch.tensor(steps, dtype=torch.float64)
        for n in live:
            d = sum(ti * (w[n].double() - w0[n].double()) for ti, w in zip(t, ws, strict=True))
            want = w0[n].double() + 1.5 * float(t[-1]) * d / float((t * t).sum())
            torch.testing.assert_close(live[n].double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        live["model.layers.0.mlp.up_proj.weight"], load_weights(cks[-1])["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.slow
def test_callback_fires_every_m_steps_logs_and_training_resumes(tmp_path):
    from driftmerge.integrations.trl import DriftExtrapolationCallback

    cb = DriftExtrapolationCallback(every=M, scale=1.25, window=K, rank=1, optimizer="reset")
    trainer = _trainer(tmp_path, max_steps=2 * M + 3, save_strategy="steps", save_steps=2 * M)
    cb.attach(trainer)
    trainer.train()
    assert [j.step for j in cb.jumps] == [M, 2 * M]
    logged = [e for e in trainer.state.log_history if "drift/scale" in e]
    assert [e["step"] for e in logged] == [M, 2 * M] and all(e["drift/scale"] == 1.25 for e in logged)
    assert all(0 < e["drift/energy_kept"] <= 1 and "drift/median_r2" in e for e in logged)
    # in the trainer's own entries, which stay whole at every step (no reward: a plain Trainer has none)
    assert all({"loss", "grad_norm", "learning_rate"} <= e.keys() for e in logged)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == list(range(1, 2 * M + 4))
    assert not any("drift/reward_before" in e for e in trainer.state.log_history)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    # a checkpoint saved after a jump resumes like any other
    again = _trainer(tmp_path, max_steps=3 * M + 1, save_strategy="steps", save_steps=2 * M)
    cb = DriftExtrapolationCallback(every=M, scale=1.25, window=K, rank=1).attach(again)
    again.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{2 * M}"))
    assert again.state.global_step == 3 * M + 1 and [j.step for j in cb.jumps] == [M, 2 * M, 3 * M]


def test_callback_rejects_bad_settings():
    from driftmerge.integrations.trl import DriftExtrapolationCallback

    for kw, msg in [({"every": 10, "window": 4, "jump": 5}, "multiple of window"), ({"every": 8}, "exactly one"),
                    ({"every": 8, "jump": 4, "optimizer": "zero"}, "keep, reset")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            DriftExtrapolationCallback(**kw)


# ---- the CLI loop --------------------------------------------------------------------------------------------------
def test_reground_cli_writes_the_next_starting_points(tmp_path, cli):
    run = make_run(tmp_path / "run", steps=(10, 20, 30, 40), noise=0.05)
    out = tmp_path / "run" / "driftmerge-reground"
    code, stdout, err = cli("reground", "--run-dir", tmp_path / "run", "--base", run.base, "--every", "20",
                            "--jump", "20", "--once")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-40", "drift_0-20", "reground.json"]
    extract(run.base, run.checkpoints[:2], out_dir=tmp_path / "a", options=ExtractOptions())
    apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=2.0))
    got, want = load_weights(out / "checkpoint-40"), load_weights(tmp_path / "m")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "checkpoint-40" / "config.json").is_file() and "checkpoint-40" in stdout
    assert json.loads((out / "checkpoint-40" / "trainer_state.json").read_text()) == {"global_step": 40}

    # training resumed from checkpoint-40 and saved 50 and 60: the next window starts at the extrapolated point
    for s, src in ((50, run.checkpoints[2]), (60, run.checkpoints[3])):
        (tmp_path / "run" / f"checkpoint-{s}").symlink_to(src)
    code, stdout, err = cli("reground", "--run-dir", tmp_path / "run", "--base", run.base, "--every", "20",
                            "--jump", "20", "--once")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-80"]
    extract(
        out / "checkpoint-40",
        [tmp_path / "run" / "checkpoint-50", tmp_path / "run" / "checkpoint-60"],
        out_dir=tmp_path / "b",
        options=ExtractOptions(steps=[10, 20]),
    )
    apply_drift(tmp_path / "b", tmp_path / "m2", options=ApplyOptions(scale=2.0))
    got, want = load_weights(out / "checkpoint-80"), load_weights(tmp_path / "m2")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert json.loads((out / "checkpoint-80" / "trainer_state.json").read_text()) == {"global_step": 80}

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = cli("reground", "--run-dir", tmp_path / "run", "--every", "20", "--jump", "20", "--once")
    assert code == 0 and "nothing written" in stdout  # the state file says where the run stands
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    code, _, err = cli("reground", "--run-dir", tmp_path / "run", "--every", "10", "--jump", "20", "--once")
    assert_one_line_error(code, err, 3, "reground.json", "--every 20 --jump 20")
    code, _, err = cli("reground", "--run-dir", tmp_path / "nope", "--every", "20", "--jump", "20", "--once")
    assert_one_line_error(code, err, 3, "nope")


def test_snapshot_bytes_counts_start_and_fit_buffers():
    from driftmerge.integrations.trl import snapshot_bytes

    model = torch.nn.Linear(100, 10, bias=False).to(torch.bfloat16)  # 1000 parameters
    assert snapshot_bytes(model) == 1000 * (2 + 8)
    assert snapshot_bytes(model, "endpoint") == 1000 * (2 + 12)
    assert snapshot_bytes(model, "pca", window=5) == 1000 * (2 + 28)


def test_a_moe_expert_stack_jumps_at_the_rank_of_each_expert():
    """transformers 5 holds Mixtral's experts as one (E, out, in) parameter: each expert's jump is rank 1 at rank 1
    (not one rank-1 matrix for the stack, not full rank)."""
    from zoo import build

    from driftmerge.core.reground import Regrounder

    model = build("mixtral")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    param = dict(model.named_parameters())[name]
    grounder = Regrounder({name: param}, every=4, jump=4, window=2, rank=1)
    grounder.start(0)
    w0 = param.detach().clone()
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(param.shape, generator=g) * 1e-2  # full rank per expert
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            param.copy_(w0 + step / 4 * direction)
        jump = grounder.step(step)
    assert jump is not None and jump.scale == 2.0
    moved = (param.detach() - w0).float()  # scale · rank-1 drift per expert
    assert moved.shape[0] == 4
    for e in range(moved.shape[0]):
        s = torch.linalg.svdvals(moved[e])
        assert s[1] < 1e-4 * s[0], (e, s[:3])
        best = torch.linalg.svdvals(2.0 * direction[e])[0]  # the rank-1 part of the true jump
        assert torch.isclose(s[0], best, rtol=1e-3)


# ---- the engine: LoRA products, restarts ---------------------------------------------------------------------------
def _params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """A dense weight, a bias and one LoRA module's factors A (r=2, n=5) and B (m=6, r=2)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "bias": (5,), "lora_A": (2, 5), "lora_B": (6, 2)}
    return {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in shapes.items()}


def _walk(params: dict[str, torch.nn.Parameter], step: int) -> None:
    """Step ``step`` of a noisy, accelerating walk (the factors' product does not follow a line)."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g) + 0.02 * step)


@pytest.mark.parametrize("fit", ["lsq", "pca", "endpoint"])
def test_lora_factors_move_as_the_truncated_line_of_their_product(fit):
    """The product ``B A`` after a jump is the rank-r part of what a dense weight following ``B_t A_t`` would get."""
    from driftmerge.core.reground import Regrounder

    params = {n: p for n, p in _params().items() if n.startswith("lora_")}
    dense = {"ba": torch.nn.Parameter((params["lora_B"] @ params["lora_A"]).detach())}
    lora = Regrounder(params, every=4, jump=2, window=2, fit=fit, lora={"m": ("lora_A", "lora_B")})
    ref = Regrounder(dense, every=4, jump=2, window=2, fit=fit)  # full rank: W_start + scale · D, extract's fit
    lora.start(0)
    ref.start(0)
    for step in range(1, 5):
        _walk(params, step)
        with torch.no_grad():
            dense["ba"].copy_(params["lora_B"] @ params["lora_A"])
        jump, _ = lora.step(step), ref.step(step)
    assert jump is not None and jump.scale == 1.5
    u, s, vh = torch.linalg.svd(dense["ba"].detach().double())
    torch.testing.assert_close(
        (params["lora_B"] @ params["lora_A"]).detach().double(), (u[:, :2] * s[:2]) @ vh[:2],
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    b, a = params["lora_B"].detach(), params["lora_A"].detach()
    torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-5, atol=1e-5)  # balanced: both S_r
    # the energy kept: Σ_{i<r} σ_i² / ‖target‖² of the module's target update
    assert jump.energy_kept == pytest.approx(float(s[:2].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
    assert jump.energy_kept < 1 and jump.tensors == 2


@pytest.mark.parametrize("fit", ["lsq", "pca", "endpoint"])
def test_a_window_survives_a_restart(tmp_path, fit):
    """State saved mid-window (torch.save, weights_only load) and loaded into a new Regrounder on new parameters:
    the same jumps, the same weights as without the restart."""
    from driftmerge.core.reground import Regrounder

    def grounder(params):  # type: ignore[no-untyped-def]
        return Regrounder(params, every=4, jump=4, window=2, fit=fit, rank=1, lora={"m": ("lora_A", "lora_B")})

    whole, cut = _params(), _params()
    g_whole, g_cut = grounder(whole), grounder(cut)
    g_whole.start(0)
    g_cut.start(0)
    for step in range(1, 7):  # jumps at 4; at 6 the second window holds one snapshot
        for params, g in ((whole, g_whole), (cut, g_cut)):
            _walk(params, step)
            g.step(step)
    torch.save(g_cut.state_dict(), tmp_path / "state.pt")
    cut = {n: torch.nn.Parameter(p.detach().clone()) for n, p in cut.items()}  # "loaded from the checkpoint"
    g_cut = grounder(cut)
    g_cut.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for step in range(7, 10):
        for params, g in ((whole, g_whole), (cut, g_cut)):
            _walk(params, step)
            g.step(step)
    assert [j.step for j in g_cut.jumps] == [j.step for j in g_whole.jumps] == [4, 8]
    assert all(torch.equal(cut[n], whole[n]) for n in whole)
    with pytest.raises(ValueError, match="settings"):
        Regrounder(cut, every=8, jump=4, window=2, fit=fit, rank=1).load_state_dict(g_whole.state_dict())
