"""End to end on tiny planted runs: recovery, exact reproduction, scaling, steps, formats, determinism."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from helpers import load_weights
from safetensors.torch import load_file, save_file
from synthetic import make_run
from transformers import AutoModelForCausalLM

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.errors import InputError
from driftmerge.io.adapter import extra_delta, read_adapter
from driftmerge.io.checkpoints import Checkpoint, resolve_steps, step_from_path


def test_planted_rank1_direction_is_recovered(tmp_path):
    run = make_run(tmp_path / "run", arch="llama", noise=0.05, steps=(10, 20, 30, 40), hidden=48)
    res = extract(run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(rank=1))
    adapter = read_adapter(tmp_path / "a")
    checked = 0
    for name, mod in adapter.by_tensor.items():
        planted = run.directions[name].flatten()
        got = mod.delta().flatten()
        cos = torch.dot(planted, got) / (planted.norm() * got.norm())
        assert cos >= 0.99, (name, float(cos))
        assert res.meta.tensors[name].r2 > 0.98
        checked += 1
    assert checked == len(adapter.modules) >= 10
    for name, d in adapter.extras.items():  # full-rank extras carry the planted vector drift
        cos = torch.dot(run.directions[name], d) / (run.directions[name].norm() * d.norm())
        assert cos >= 0.99, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_full_rank_single_checkpoint_reproduces_it(runs, tmp_path, arch):
    run = runs[arch]
    full = max(min(i.shape) for i in Checkpoint(run.base).infos.values() if len(i.shape) == 2)  # the largest rank
    extract(run.base, run.checkpoints[-1:], out_dir=tmp_path / "a", options=ExtractOptions(rank=full, svd="exact"))
    out = apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.0)).out_dir
    mine, want = load_weights(out), load_weights(run.checkpoints[-1])
    assert set(mine) == set(want)
    for name, w in want.items():  # biases and norms included
        torch.testing.assert_close(mine[name], w, rtol=0, atol=2e-6, msg=name)


def test_scale_moves_every_tensor_linearly_and_step_matches_scale(runs, tmp_path):
    run = runs["qwen2"]
    res = extract(run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(rank=2))
    assert res.meta.s_ref == 300 and res.meta.base_step == 0
    w0 = load_weights(run.base)
    one = load_weights(apply_drift(tmp_path / "a", tmp_path / "m1", options=ApplyOptions(scale=1.0)).out_dir)
    ext = load_weights(apply_drift(tmp_path / "a", tmp_path / "m15", options=ApplyOptions(scale=1.5)).out_dir)
    by_step = load_weights(apply_drift(tmp_path / "a", tmp_path / "s450", options=ApplyOptions(step=450)).out_dir)
    kinds = {r.stored for r in res.meta.tensors.values()}
    assert kinds == {"lora", "extras"}
    for name in w0:
        torch.testing.assert_close(ext[name] - w0[name], 1.5 * (one[name] - w0[name]), rtol=1e-4, atol=1e-6)
        assert torch.equal(by_step[name], ext[name]), name
    moved = [n for n in w0 if not torch.equal(one[n], w0[n])]
    assert len(moved) == len(w0)  # extras (biases, norms) move too


def test_applied_model_loads_runs_and_shards(runs, tmp_path):
    run = runs["llama"]
    extract(run.base, run.checkpoints, out_dir=tmp_path / "a")
    out = apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.25, max_shard_size="40KB"))
    assert out.shards > 1
    index = json.loads((out.out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        f"model-{i:05d}-of-{out.shards:05d}.safetensors" for i in range(1, out.shards + 1)
    }
    assert (out.out_dir / "config.json").is_file() and (out.out_dir / "generation_config.json").is_file()
    card = (out.out_dir / "README.md").read_text()
    assert "scale 1.25" in card and "step 375" in card
    model = AutoModelForCausalLM.from_pretrained(out.out_dir)
    with torch.no_grad():
        logits = model(torch.arange(12).unsqueeze(0)).logits
    assert logits.shape == (1, 12, 64) and torch.isfinite(logits).all()
    merged = load_weights(out.out_dir)
    for name, p in model.state_dict().items():
        if name in merged:
            assert torch.equal(p, merged[name])


def test_dtype_follows_the_base_unless_asked(tmp_path):
    run = make_run(tmp_path / "run", arch="llama", dtype=torch.bfloat16, steps=(5, 9))
    extract(run.base, run.checkpoints, out_dir=tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "driftmerge.json").read_text())
    assert meta["storage_dtype"] == "bfloat16"
    same = load_weights(apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.5)).out_dir)
    assert {t.dtype for t in same.values()} == {torch.bfloat16}
    f32 = apply_drift(tmp_path / "a", tmp_path / "m32", options=ApplyOptions(scale=1.5, dtype="float32")).out_dir
    assert {t.dtype for t in load_weights(f32).values()} == {torch.float32}
    cfg = json.loads((f32 / "config.json").read_text())
    assert "float32" in {cfg.get("dtype"), cfg.get("torch_dtype")}
    AutoModelForCausalLM.from_pretrained(f32)


def test_adapter_folder_contents(runs, tmp_path):
    run = runs["gpt2"]
    res = extract(run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(rank=1, fit="pca", seed=3))
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert names == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "drift_extras.safetensors",
        "driftmerge.json",
        "README.md",
    }
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True and cfg["r"] == cfg["lora_alpha"] == 1
    assert cfg["lora_dropout"] == 0 and cfg["inference_mode"] is True and cfg["use_rslora"] is False
    meta = json.loads((tmp_path / "a" / "driftmerge.json").read_text())
    assert meta["fit"] == "pca" and meta["seed"] == 3 and [c["step"] for c in meta["checkpoints"]] == [100, 200, 300]
    for rec in meta["tensors"].values():
        assert {"shape", "rank", "energy", "drift_norm", "r2"} <= set(rec)
        assert rec["rank"] != 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card and "driftmerge" in card
    assert "drift_extras.safetensors" in card
    assert res.summary.adapter_bytes < res.summary.checkpoint_bytes


def test_same_inputs_and_seed_give_identical_bytes(runs, tmp_path):
    run = runs["llama"]
    for name in ("a", "c"):
        extract(run.base, run.checkpoints, out_dir=tmp_path / name, options=ExtractOptions(rank=2))
    for f in ("adapter_model.safetensors", "drift_extras.safetensors", "driftmerge.json", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes(), f


def test_memory_budget_and_workers_do_not_change_a_byte(runs, tmp_path, monkeypatch, caplog):
    run = runs["llama"]
    caplog.set_level(logging.INFO, logger="driftmerge")
    # a big budget with two workers; a 1-byte one (no read-ahead, one matrix in flight at a time); one worker
    monkeypatch.setattr("driftmerge.commands.options.MIN_MEMORY", 1)
    threads = torch.get_num_threads()
    try:
        for name, budget, workers in (("a", 8 << 30, 2), ("b", 1, 2), ("c", 8 << 30, 1)):
            torch.set_num_threads(workers)
            caplog.clear()
            res = extract(
                run.base, run.checkpoints, out_dir=tmp_path / name, options=ExtractOptions(rank=2, max_memory=budget)
            )
            assert res.meta.max_memory == budget
            assert f"({workers} at a time)" in caplog.text
            assert torch.get_num_threads() == workers  # restored after the pass
            batches = int(re.search(r"in (\d+) batches", caplog.text).group(1))
            assert batches == res.summary.lora_tensors  # the CPU factorizes each matrix as it comes
    finally:
        torch.set_num_threads(threads)
    for other in ("b", "c"):
        for f in ("adapter_model.safetensors", "drift_extras.safetensors"):
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / other / f).read_bytes(), (other, f)


def test_include_exclude(runs, tmp_path):
    run = runs["llama"]
    res = extract(
        run.base,
        run.checkpoints,
        out_dir=tmp_path / "a",
        options=ExtractOptions(include=r"\.mlp\.", exclude="down_proj"),
    )
    assert res.meta.tensors
    assert all(".mlp." in n and "down_proj" not in n for n in res.meta.tensors)
    out = load_weights(apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.0)).out_dir)
    base = load_weights(run.base)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_sharded_and_legacy_bin_inputs_give_the_same_adapter(runs, tmp_path):
    run = runs["llama"]
    ref = extract(run.base, run.checkpoints, out_dir=tmp_path / "ref", options=ExtractOptions(rank=1))
    sharded, legacy = [], []
    for src in [run.base, *run.checkpoints]:
        w = load_weights(src)
        model = AutoModelForCausalLM.from_pretrained(src)
        d = tmp_path / "sharded" / src.name
        model.save_pretrained(d, max_shard_size="30KB")
        assert (d / "model.safetensors.index.json").is_file()
        sharded.append(d)
        b = tmp_path / "legacy" / src.name
        b.mkdir(parents=True)
        torch.save(w, b / "pytorch_model.bin")
        (b / "config.json").write_bytes((src / "config.json").read_bytes())
        legacy.append(b)
    for folders, out in ((sharded, "s"), (legacy, "l")):
        res = extract(folders[0], folders[1:], out_dir=tmp_path / out, options=ExtractOptions(rank=1))
        assert [c.step for c in res.meta.checkpoints] == [100, 200, 300]
        for name, rec in ref.meta.tensors.items():
            assert res.meta.tensors[name].drift_norm == pytest.approx(rec.drift_norm, rel=1e-6)
            assert res.meta.tensors[name].energy == pytest.approx(rec.energy, abs=1e-6)


def test_steps_from_names_and_sorting():
    assert step_from_path("runs/checkpoint-500") == 500
    assert step_from_path("runs/global_step_120/actor/huggingface") == 120
    assert step_from_path("ckpt-100") == 100 and step_from_path("step500") == 500
    assert step_from_path("final") is None
    steps, order, source = resolve_steps(["c/checkpoint-1000", "c/checkpoint-200"], None)
    assert steps == [200, 1000] and order == [1, 0] and source == "folder names"
    assert resolve_steps(["a", "b"], None, base_step=5)[0] == [6, 7]
    with pytest.raises(InputError, match="increase"):
        resolve_steps(["a", "b"], [200, 100])
    with pytest.raises(InputError, match="--base-step"):
        resolve_steps(["checkpoint-100"], None, base_step=100)
    with pytest.raises(InputError, match="step 5"):
        resolve_steps(["x/step5", "y/step5"], None)


def test_explicit_steps_and_base_step_set_the_scale(runs, tmp_path):
    run = runs["llama"]
    res = extract(
        run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(steps=[110, 120, 130], base_step=100)
    )
    assert res.meta.s_ref == 130
    a = apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(step=145))
    assert a.scale == pytest.approx(1.5)


def test_get_reads_one_tensor_with_its_header_shape(runs):
    ck = Checkpoint(runs["llama"].base)
    assert ck.format == "safetensors" and len(ck.infos) > 10
    name = next(iter(ck.infos))
    assert tuple(ck.get(name).shape) == ck.infos[name].shape


def test_tied_lm_head_stored_in_the_files_moves_with_the_embedding(runs, tmp_path):
    """Some checkpoints store a tied lm_head.weight explicitly: it is fitted once and applied to both."""
    run = runs["gpt2"]
    folders = []
    for src in [run.base, *run.checkpoints]:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        w = load_file(str(dst / "model.safetensors"))
        w["lm_head.weight"] = w["transformer.wte.weight"].clone()
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
        folders.append(dst)
    res = extract(folders[0], folders[1:], out_dir=tmp_path / "a")
    assert res.meta.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in res.meta.tensors
    out = load_weights(apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=2.0)).out_dir)
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert not torch.equal(out["lm_head.weight"], load_file(str(folders[0] / "model.safetensors"))["lm_head.weight"])


def test_other_weights_of_the_same_architecture_need_the_flag_then_warn(runs, tmp_path, caplog):
    run = runs["llama"]
    extract(run.base, run.checkpoints, out_dir=tmp_path / "a")
    with pytest.raises(InputError, match=r"checkpoint at step 100.*--allow-other-base"):  # its drift would count twice
        apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.0, base=run.checkpoints[0]))
    with caplog.at_level("WARNING", logger="driftmerge"):
        options = ApplyOptions(scale=1.0, base=run.checkpoints[0], allow_other_base=True)
        apply_drift(tmp_path / "a", tmp_path / "m", options=options)
    assert "other weights" in caplog.text


def test_tensor_without_drift_is_left_out_and_reported(runs, tmp_path):
    run = runs["llama"]
    frozen = "model.layers.0.self_attn.k_proj.weight"
    base_w = load_file(str(run.base / "model.safetensors"))[frozen]
    folders = []
    for src in run.checkpoints:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        w = load_file(str(dst / "model.safetensors"))
        w[frozen] = base_w.clone()
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
        folders.append(dst)
    res = extract(run.base, folders, out_dir=tmp_path / "a")
    assert res.meta.tensors[frozen].stored == "zero" and res.summary.zero_tensors == [frozen]
    adapter = read_adapter(tmp_path / "a")
    assert "model.layers.0.self_attn.k_proj" not in adapter.modules
    assert all(m.rank >= 1 for m in adapter.modules.values())
    out = load_weights(apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.5)).out_dir)
    assert torch.equal(out[frozen], base_w)


@pytest.mark.parametrize("rank", [1, 1.0])
def test_large_tensors_peft_cannot_carry_are_stored_factored(tmp_path, monkeypatch, rank):
    """Qwen2-VL's 5-D patch-embedding convolution has no PEFT target: with the size threshold lowered it goes to the
    extras as rank-r factors of its ``(prod(shape[:-1]), shape[-1])`` view; ``apply`` adds exactly ``B A`` (and at
    rank share 1.0, the whole drift)."""
    from safetensors import safe_open
    from zoo import make_zoo_run

    import driftmerge.io.assemble as assemble

    monkeypatch.setattr(assemble, "FACTOR_EXTRAS_MIN", 256)
    run = make_zoo_run(tmp_path / "run", "qwen2_vl")
    name = "visual.patch_embed.proj.weight"
    extract(
        run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(rank=rank, factor_dtype="float32")
    )
    adapter = read_adapter(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "drift_extras.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{name}.extra_A", f"{name}.extra_B"} <= keys and name not in keys
    rec = adapter.meta.tensors[name]
    assert rec.stored == "extras" and len(rec.shape) == 5 and rec.rank is not None and rec.rank >= 1
    if isinstance(rank, int):
        assert rec.rank == rank
    assert adapter.meta.summary.extras_kinds["factored"] >= 1
    stored = adapter.extras[name]
    apply_drift(tmp_path / "a", tmp_path / "m", options=ApplyOptions(scale=1.0))
    base, last, out = (load_weights(p)[name].float() for p in (run.base, run.checkpoints[-1], tmp_path / "m"))
    assert torch.allclose(out - base, extra_delta(stored), atol=1e-6)  # the stored factors, nothing else
    if isinstance(rank, float):  # every singular value kept: the fitted drift itself
        assert torch.allclose(out, last, atol=1e-5)
    else:
        assert torch.linalg.matrix_rank(extra_delta(stored).reshape(-1, rec.shape[-1]), atol=1e-7) == 1
