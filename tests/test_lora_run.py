"""Runs trained with LoRA: checkpoints are PEFT adapter folders. The drift is the line of the merged updates
``s · B_t A_t``, fitted from the factors; PEFT's own loader and merge are the oracle."""

from __future__ import annotations

import pytest
import torch
from helpers import load_weights
from synthetic import tiny_config

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.core.trajectory import LineAccumulator
from driftmerge.errors import InputError
from driftmerge.io.adapter import read_adapter

STEPS = (100, 200, 300)


def _lora_run(folder, *, curved: bool, tokens: bool = False):
    """A base and three PEFT checkpoints: ``B(t) = t B1`` with ``A`` fixed (the product moves on a line), or also
    ``A(t) = A0 + t A1`` (``curved``: the product bends); ``lm_head`` as a modules_to_save copy moving on a line;
    or (``tokens``) trainable tokens of the embedding instead of its LoRA and the lm_head copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    base.save_pretrained(folder / "base")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", *([] if tokens else ["embed_tokens"])],
        modules_to_save=None if tokens else ["lm_head"],
        trainable_token_indices={"embed_tokens": [3, 7]} if tokens else None,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 6},
    )
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(1)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    slope = {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in start.items()}
    for n in start:
        if "lora_B" in n or "lora_embedding_B" in n:
            start[n] = torch.zeros_like(start[n])
    paths = []
    for s in STEPS:
        x = s / STEPS[-1]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in start:
                    continue
                is_a = "lora_A" in n or "lora_embedding_A" in n
                p.copy_(start[n] + (x * slope[n] if (not is_a or curved) else 0))
        model.save_pretrained(folder / f"checkpoint-{s}")
        paths.append(folder / f"checkpoint-{s}")
    return folder / "base", paths


def _merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return {
        n: p.detach().float()
        for n, p in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()
    }


def test_a_lora_run_on_a_line_extrapolates_like_peft(tmp_path):
    """The product moves on a line: at the rank that holds it (the whole energy: the LoRA modules come out at their
    own ranks, the full-rank lm_head copy at full rank), apply --scale 1 is the last checkpoint merged by PEFT, and
    --scale 2 is twice the way there."""
    base, cks = _lora_run(tmp_path, curved=False)
    res = extract(base, cks, out_dir=tmp_path / "a", options=ExtractOptions(rank=1.0, svd="exact"))
    recs = res.meta.tensors
    assert recs["model.layers.0.self_attn.q_proj.weight"].stored == "lora"
    assert (
        recs["model.layers.0.self_attn.q_proj.weight"].rank == 4
        and recs["model.layers.0.mlp.down_proj.weight"].rank == 2
    )
    assert recs["model.layers.0.self_attn.k_proj.weight"].stored == "zero"  # not trained
    assert recs["lm_head.weight"].stored == "lora"  # the modules_to_save copy, a dense drift
    assert res.summary.median_r2 == pytest.approx(1.0)
    w0 = load_weights(base)
    last = _merged(base, cks[-1])
    for scale in (1.0, 2.0):
        apply_drift(tmp_path / "a", tmp_path / f"m{scale}", options=ApplyOptions(scale=scale))
        out = load_weights(tmp_path / f"m{scale}")
        for name, w in w0.items():
            want = w.float() + scale * (last[name] - w.float())
            assert torch.allclose(out[name].float(), want, atol=1e-5), (scale, name)


@pytest.mark.parametrize("fit", ["lsq", "pca", "endpoint"])
def test_a_bending_lora_run_fits_the_product_line(tmp_path, fit):
    """A and B both move, so ``B_t A_t`` bends: the drift equals the same fit over the dense merged deltas
    (full rank kept), though no dense delta of a LoRA module was ever formed."""
    base, cks = _lora_run(tmp_path, curved=True)
    extract(base, cks, out_dir=tmp_path / "a", options=ExtractOptions(rank=1.0, fit=fit, svd="exact"))
    adapter = read_adapter(tmp_path / "a")
    w0 = load_weights(base)
    merged = [_merged(base, ck) for ck in cks]
    checked = 0
    for name, view in adapter.by_tensor.items():
        acc = LineAccumulator([float(s) for s in STEPS], fit)
        for m in merged:
            acc.add(m[name] - w0[name].float())
        want = acc.finish()
        assert torch.allclose(view.delta(), want.drift, atol=2e-6 * float(want.drift.abs().max()) + 1e-9), name
        assert adapter.meta.tensors[name].r2 == pytest.approx(want.r2, abs=1e-5), name  # float32 W0 + Δ rounding
        checked += 1
    assert checked >= 7  # q, v, down per layer, the embedding, lm_head


def test_trainable_tokens_move_only_their_rows(tmp_path):
    base, cks = _lora_run(tmp_path, curved=False, tokens=True)
    extract(base, cks, out_dir=tmp_path / "a", options=ExtractOptions(rank=1.0))
    apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.0))
    out, w0, last = load_weights(tmp_path / "m"), load_weights(base), _merged(base, cks[-1])
    name = "model.embed_tokens.weight"
    assert torch.allclose(out[name].float(), last[name], atol=1e-5)
    moved = (out[name].float() - w0[name].float()).abs().amax(dim=1) > 1e-6  # float32 round-off aside
    assert moved[[3, 7]].all() and int(moved.sum()) == 2  # the trained rows, nothing else


def test_a_mix_of_full_and_lora_checkpoints_is_one_clear_error(tmp_path):
    from synthetic import make_run

    base, cks = _lora_run(tmp_path / "lora", curved=False)
    full = make_run(tmp_path / "full", steps=(400,))
    with pytest.raises(InputError, match="one run"):
        extract(base, [*cks, full.checkpoints[0]], out_dir=tmp_path / "a")
