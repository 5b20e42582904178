"""PEFT is the oracle: its loader + merge must give exactly what driftmerge's own apply writes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights
from peft import PeftModel
from synthetic import make_run
from transformers import AutoModelForCausalLM

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions


def peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("rank", [1, 0.9])
def test_peft_merge_equals_apply(runs, tmp_path, arch, rank):
    # the energy rule runs on a noisy run, where modules need different ranks and rank_pattern is exercised
    run = runs[arch] if isinstance(rank, int) else make_run(tmp_path / "noisy", arch=arch, noise=1.0, seed=3)
    adapter = tmp_path / "adapter"
    res = extract(run.base, run.checkpoints, out_dir=adapter, options=ExtractOptions(rank=rank))
    lora = {n: r for n, r in res.meta.tensors.items() if r.stored == "lora"}
    assert lora, "no LoRA tensors: the oracle would check nothing"
    if isinstance(rank, float):  # the energy rule must give different ranks, so rank_pattern is exercised
        assert len({r.rank for r in lora.values()}) > 1
        assert json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    if arch == "gpt2":
        assert {r.kind for r in lora.values()} >= {"conv1d", "embedding"}
        assert res.meta.tied == {}  # save_pretrained drops the tied lm_head, nothing to tie here
    ours = apply_drift(adapter, tmp_path / "model", options=ApplyOptions(scale=1.0)).out_dir
    mine = load_weights(ours)
    theirs = peft_merged(run.base, adapter)
    base = load_weights(run.base)
    for name in lora:
        assert not torch.equal(mine[name], base[name]), name  # the drift did move it
        torch.testing.assert_close(theirs[name], mine[name], rtol=0, atol=2e-7, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scaled_adapter_equals_apply_at_that_scale(runs, tmp_path, arch):
    run = runs[arch]
    adapter = tmp_path / "adapter"
    res = extract(run.base, run.checkpoints, out_dir=adapter, options=ExtractOptions(rank=2))
    scaled = apply_drift(adapter, tmp_path / "scaled", options=ApplyOptions(scale=1.5, format="adapter")).out_dir
    model = apply_drift(adapter, tmp_path / "model", options=ApplyOptions(scale=1.5)).out_dir
    theirs = peft_merged(run.base, scaled)
    mine = load_weights(model)
    lora = [n for n, r in res.meta.tensors.items() if r.stored == "lora"]
    for name in lora:
        torch.testing.assert_close(theirs[name], mine[name], rtol=0, atol=3e-7, msg=name)
    # the scaled extras are 1.5 x the originals, and driftmerge applies the scaled adapter at scale 1 the same way
    again = apply_drift(scaled, tmp_path / "again", options=ApplyOptions(scale=1.0)).out_dir
    for name, w in load_weights(again).items():
        torch.testing.assert_close(w, mine[name], rtol=0, atol=1e-6, msg=name)


def test_peft_forward_matches_applied_model(runs, tmp_path):
    """Unmerged PEFT inference (LoRA forward path) agrees with the merged weights, extras aside."""
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    extract(run.base, run.checkpoints, out_dir=adapter, options=ExtractOptions(rank=1, exclude=r"norm"))
    applied = apply_drift(adapter, tmp_path / "model", options=ApplyOptions(scale=1.0)).out_dir
    ids = torch.arange(10).unsqueeze(0)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), adapter).eval()
    ours = AutoModelForCausalLM.from_pretrained(applied).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-5)
