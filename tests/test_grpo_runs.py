"""Runs as TRL's real ``GRPOTrainer`` writes them, full-weight and LoRA, through ``extract --run-dir`` and
``apply``: with the endpoint fit at full rank, ``apply --scale 1`` is the last checkpoint (merged by PEFT for the
LoRA run); the default lsq fit runs on both and records its linearity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from grpo import make_grpo_trainer
from helpers import load_weights, run_cli

pytestmark = pytest.mark.slow  # TRL's import and two short GRPO runs


def _run(tmp_path, *, lora: bool):
    """A base folder (the model before training) and a run folder with checkpoint-2, -4, -6."""
    trainer = make_grpo_trainer(tmp_path / "run", lora=lora, max_steps=6, save_steps=2)
    # LoRA's B starts at zero: a copy merged and unwrapped is the base as training starts
    model = copy.deepcopy(trainer.model).merge_and_unload() if lora else trainer.model
    model.save_pretrained(tmp_path / "base")
    trainer.processing_class.save_pretrained(tmp_path / "base")
    trainer.train()
    return tmp_path / "base", tmp_path / "run"


def _merged_last(base, ck):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ck).merge_and_unload()
    return {n: p.detach().float() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_grpo_run_extracts_and_applies(tmp_path, monkeypatch, capsys, lora):
    base, run = _run(tmp_path, lora=lora)
    cks = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in cks] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (cks[-1] / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()

    code, _, err = run_cli(["extract", base, "--run-dir", run, "-o", tmp_path / "lsq"], monkeypatch, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "lsq" / "driftmerge.json").read_text())
    assert [c["step"] for c in meta["checkpoints"]] == [2, 4, 6] and meta["summary"]["median_r2"] is not None

    # the endpoint fit at full rank (32: the widest matrix's smaller side) is the last checkpoint's delta itself
    args = ["extract", base, "--run-dir", run, "-o", tmp_path / "end", "--fit", "endpoint", "--rank", "32"]
    code, _, err = run_cli([*args, "--svd", "exact"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["apply", tmp_path / "end", "--scale", "1", "-o", tmp_path / "m"], monkeypatch, capsys)
    assert code == 0, err
    got = load_weights(tmp_path / "m")
    want = _merged_last(base, cks[-1]) if lora else {n: w.float() for n, w in load_weights(cks[-1]).items()}
    w0 = load_weights(base)
    moved = 0
    for name, w in got.items():
        tol = 1e-5 * max(float(want[name].abs().max()), 1e-2)
        assert torch.allclose(w.float(), want[name], atol=tol), name
        moved += not torch.equal(want[name], w0[name].float())
    assert moved >= (14 if lora else 20)  # LoRA: 7 projections x 2 layers; full: every tensor trains
