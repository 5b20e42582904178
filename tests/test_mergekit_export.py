"""``driftmerge export-mergekit``: the weights, a config mergekit accepts, and ``mergekit-yaml`` rebuilding ``apply``.

The merges run the real ``mergekit-yaml`` (mergekit 0.1.5, the dev extra) offline on a tiny planted Qwen2 run
(attention biases, so the extras hold biases as well as norms), in float32 so the comparison is tight: mergekit
computes ``W0 + Σ w_i (W_i − W0)`` and ``apply`` computes ``W0 + S · B A``, the same number through other float32
roundings, so they agree to a few ulps of the largest weight.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, leftovers, load_weights, run_cli
from synthetic import make_run

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.export_mergekit import build_config, checkpoint_weights, export_mergekit, render_yaml
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.core.trajectory import LineAccumulator
from driftmerge.errors import InputError
from driftmerge.schema import CheckpointRecord, DriftMeta

MERGEKIT_YAML = shutil.which("mergekit-yaml")
needs_mergekit = pytest.mark.skipif(MERGEKIT_YAML is None, reason="no mergekit-yaml (pip install -e '.[dev]')")
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Base + 3 checkpoints with noise and curvature, so the drift is full rank and lsq differs from endpoint."""
    return make_run(tmp_path_factory.mktemp("mk-run"), arch="qwen2", noise=0.05, curvature=0.2, seed=7)


@pytest.fixture(scope="module")
def adapters(run, tmp_path_factory) -> dict[str, Path]:
    """A full-rank adapter (exact SVD at the largest ``min(m, n)``: every matrix keeps all its directions),
    the default rank-1 adapter, and a pca one."""
    root = tmp_path_factory.mktemp("mk-adapters")
    full_rank = max(min(w.shape) for w in load_weights(run.base).values() if w.dim() == 2)
    opts = {
        "full": ExtractOptions(rank=full_rank, svd="exact"),
        "rank1": ExtractOptions(),
        "pca": ExtractOptions(fit="pca"),
    }
    for name, o in opts.items():
        extract(run.base, run.checkpoints, out_dir=root / name, options=o)
    return {name: root / name for name in opts}


def mergekit(config: Path, out: Path) -> dict[str, torch.Tensor]:
    """Run ``mergekit-yaml`` offline on ``config``; return the merged weights."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cache = out.parent / f"{out.name}-lora-cache"
    cmd = [MERGEKIT_YAML, str(config), str(out), "--no-copy-tokenizer", "--quiet", "--num-threads", "2",
           "--lora-merge-cache", str(cache), "--lora-merge-dtype", "float32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_weights(out)


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b|`` in units of ``eps · max |W|`` (a float32 ulp at the largest weight, within a factor 2)."""
    return float((a.double() - b.double()).abs().max() / (EPS * max(a.abs().max(), b.abs().max())))


# ---- the weights ---------------------------------------------------------------------------------------------
def meta_of(fit: str, steps: list[int], base_step: int = 0, **extra) -> DriftMeta:
    cks = [CheckpointRecord(ref=f"/run/checkpoint-{s}", step=s) for s in steps]
    return DriftMeta.model_construct(fit=fit, checkpoints=cks, base_step=base_step, s_ref=steps[-1], **extra)


def test_lsq_weights_rebuild_the_fitted_drift():
    """``Σ w_i D_i = S · D`` where ``D`` is what the lsq fit of extract computes (trajectory.LineAccumulator)."""
    steps, base_step, scale = [150, 250, 450], 50, 1.5
    t = [s - base_step for s in steps]  # 100, 200, 400
    w = checkpoint_weights(meta_of("lsq", steps, base_step), scale)
    assert w == pytest.approx([scale * 400 * x / (100**2 + 200**2 + 400**2) for x in t], rel=1e-15)
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 5, generator=gen, dtype=torch.float64) for _ in steps]
    acc = LineAccumulator(t, "lsq")
    for d in deltas:
        acc.add(d.float())
    drift = acc.finish().drift.double()
    torch.testing.assert_close(sum(wi * d for wi, d in zip(w, deltas, strict=True)), scale * drift, rtol=1e-6, atol=0)


def test_endpoint_single_checkpoint_and_scaled_adapter_weights():
    assert checkpoint_weights(meta_of("endpoint", [100, 200, 300]), 1.25) == [0.0, 0.0, 1.25]
    assert checkpoint_weights(meta_of("lsq", [500], base_step=100), 2.0) == pytest.approx([2.0], rel=1e-15)
    assert checkpoint_weights(meta_of("lsq", [100, 200], scale=2.0), 1.0) == pytest.approx(
        [2 * 200 * 100 / 50000, 2 * 200 * 200 / 50000], rel=1e-15
    )  # an adapter scaled by `apply --format adapter` moves scale · 2 · D


def test_pca_has_no_checkpoint_weights():
    with pytest.raises(InputError, match="--via lora"):
        checkpoint_weights(meta_of("pca", [100, 200, 300]), 1.0)


def test_config_parses_as_mergekit_configuration():
    """mergekit reads back the paths and weights, also for paths that hold ``+`` and ``@`` (mapping form)."""
    config_mod = pytest.importorskip("mergekit.config")
    import yaml

    meta = meta_of("lsq", [100, 200])
    meta.checkpoints[1].ref = "/runs/a+b@c/checkpoint-200"
    for via, base in (("checkpoints", "/runs/base"), ("lora", "/runs/x@y/base")):
        config = build_config(meta, 1.5, via=via, adapter_dir="/runs/adapter+1", base=base, out_dtype="bfloat16")
        parsed = config_mod.MergeConfiguration.model_validate(yaml.safe_load(render_yaml(config, ["a comment"])))
        assert parsed.merge_method == "task_arithmetic" and parsed.out_dtype == "bfloat16"
        assert parsed.base_model.model.path == base and parsed.parameters == {"normalize": False, "lambda": 1.0}
        got = [(m.model.model.path, m.model.lora and m.model.lora.path, m.parameters["weight"]) for m in parsed.models]
        refs = [c.ref for c in meta.checkpoints]
        want = [(base, "/runs/adapter+1", 1.5)]
        if via == "checkpoints":
            want = [(r, None, w) for r, w in zip(refs, checkpoint_weights(meta, 1.5), strict=True)]
        assert got == want


# ---- mergekit-yaml against apply -----------------------------------------------------------------------------
@pytest.mark.slow
@needs_mergekit
def test_checkpoint_merge_equals_full_rank_apply(run, adapters, tmp_path):
    """The exported checkpoint merge rebuilds ``apply --scale 1.5`` from a full-rank adapter, every tensor (norms and
    biases included), to 4 float32 ulps of each tensor's largest weight."""
    scale = 1.5
    r = export_mergekit(adapters["full"], tmp_path / "mk.yaml", scale=scale)
    assert [Path(m).parent for m, _ in r.models] == [run.base.parent] * 3
    merged = mergekit(r.out_file, tmp_path / "merged")
    apply_drift(adapters["full"], tmp_path / "applied", options=ApplyOptions(scale=scale))
    applied, base = load_weights(tmp_path / "applied"), load_weights(run.base)
    assert merged.keys() == applied.keys() == base.keys()
    for name in applied:
        assert merged[name].dtype == torch.float32
        assert max_ulps(merged[name], applied[name]) <= 4, name
        assert not torch.equal(merged[name], base[name]), name  # every tensor moved, extras too
    # the rank-1 adapter's apply is the rank-1 approximation: visibly off the full merge
    apply_drift(adapters["rank1"], tmp_path / "applied-r1", options=ApplyOptions(scale=scale))
    rank1 = load_weights(tmp_path / "applied-r1")
    assert max(max_ulps(merged[n], rank1[n]) for n in merged) > 1000


@pytest.mark.slow
@needs_mergekit
def test_lora_merge_equals_apply_on_lora_tensors(run, adapters, tmp_path):
    """``BASE+ADAPTER`` at weight S rebuilds apply's LoRA-carrying tensors from the rank-1 adapter as written by
    extract (PEFT loads it inside mergekit); the extras (norms, biases) stay at the base."""
    r = export_mergekit(adapters["rank1"], tmp_path / "mk.yaml", step=600, via="lora")  # step 600 = scale 2
    assert r.scale == 2.0 and r.models == [(f"{run.base}+{adapters['rank1']}", 2.0)]
    merged = mergekit(r.out_file, tmp_path / "merged")
    apply_drift(adapters["rank1"], tmp_path / "applied", options=ApplyOptions(scale=2.0))
    applied, base = load_weights(tmp_path / "applied"), load_weights(run.base)
    records = json.loads((adapters["rank1"] / "driftmerge.json").read_text())["tensors"]
    lora = {n for n, rec in records.items() if rec["stored"] == "lora"}
    extras = {n for n, rec in records.items() if rec["stored"] == "extras"}
    assert lora and any(n.endswith(".bias") for n in extras) and any("norm" in n for n in extras)
    for name in lora:
        assert max_ulps(merged[name], applied[name]) <= 4, name
    for name in extras:
        assert torch.equal(merged[name], base[name]) and not torch.equal(applied[name], base[name]), name


@pytest.mark.slow
@needs_mergekit
def test_lora_merge_of_a_moe_adapter_equals_apply(tmp_path):
    """A Mixtral adapter carries its experts and routers through PEFT ``target_parameters``; mergekit merges it
    with PEFT and writes the transformers-5 layout (fused experts), so compare the models as transformers loads
    them: every parameter but the extras' (norms) equals ``apply``'s."""
    from zoo import load, make_zoo_run

    run = make_zoo_run(tmp_path / "run", "mixtral")
    extract(run.base, run.checkpoints, out_dir=tmp_path / "a", options=ExtractOptions(rank=1, factor_dtype="float32"))
    r = export_mergekit(tmp_path / "a", tmp_path / "mk.yaml", scale=1.5, via="lora")
    mergekit(r.out_file, tmp_path / "merged")
    apply_drift(tmp_path / "a", tmp_path / "applied", options=ApplyOptions(scale=1.5))
    merged, applied, base = (
        load("mixtral", p).state_dict() for p in (tmp_path / "merged", tmp_path / "applied", run.base)
    )
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(applied[experts], base[experts])
    for name, w in applied.items():
        norm = name.endswith("norm.weight")  # the extras: PEFT and mergekit do not read them
        assert torch.allclose(merged[name], base[name] if norm else w, rtol=0, atol=1e-5 * float(w.abs().max())), name


@pytest.mark.slow
@needs_mergekit
def test_bfloat16_base_stores_bfloat16_like_apply(tmp_path, monkeypatch, capsys):
    """A bfloat16 run: the default config computes in float32 and stores bfloat16 (the base's dtype), as apply
    does. Both round the same float32 number to a few float32 ulps; bfloat16 checkpoints make exact ties (a result
    halfway between two bfloat16 values) common, and there those few ulps may round either way: the two outputs
    differ only there, by one bfloat16 step."""
    run = make_run(tmp_path / "run", arch="llama", noise=0.05, curvature=0.2, seed=3, dtype=torch.bfloat16)
    extract(run.base, run.checkpoints, out_dir=tmp_path / "adapter", options=ExtractOptions(rank=32, svd="exact"))
    code, _, err = run_cli(
        ["export-mergekit", tmp_path / "adapter", "--scale", "1.5", "-o", tmp_path / "mk.yaml"], monkeypatch, capsys
    )
    assert code == 0, err
    merged = mergekit(tmp_path / "mk.yaml", tmp_path / "merged")
    apply_drift(tmp_path / "adapter", tmp_path / "applied", options=ApplyOptions(scale=1.5))
    apply_drift(tmp_path / "adapter", tmp_path / "applied32", options=ApplyOptions(scale=1.5, dtype="float32"))
    applied, exact = load_weights(tmp_path / "applied"), load_weights(tmp_path / "applied32")
    for name, w in applied.items():
        assert merged[name].dtype == w.dtype == torch.bfloat16, name
        m, a = merged[name].float(), w.float()
        differ = m != a
        assert float((m - a).abs().max()) <= torch.finfo(torch.bfloat16).eps * float(a.abs().max()), name
        off_tie = (exact[name] - (m + a) / 2)[differ].abs()  # distance to the midpoint (exact in float32)
        assert not differ.any() or float(off_tie.max()) <= 4 * EPS * float(a.abs().max()), name


# ---- the command ---------------------------------------------------------------------------------------------
def test_cli_writes_the_config_and_says_how_to_run_it(adapters, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("export-mergekit", adapters["rank1"], "--scale", "1.5")
    assert code == 0, err
    target = tmp_path / "driftmerge-mergekit.yaml"
    text = target.read_text()
    assert f"mergekit-yaml {target} OUT_DIR" in out and f"mergekit-yaml {target} OUT_DIR" in text
    assert "keeps rank 1" in out and "keeps rank 1" in text  # the rank-1 approximation, said honestly
    assert text.startswith("# mergekit config written by driftmerge") and "--scale 1.5" in text
    code, out, err = cli("export-mergekit", adapters["rank1"], "--step", "600", "--via", "lora", "--overwrite")
    assert code == 0, err
    assert "--lora-merge-cache" in out and "drift_extras.safetensors" in out and "weight: 2.0" in target.read_text()
    assert not leftovers(tmp_path)


def test_cli_refuses_pca_with_checkpoints(adapters, tmp_path, cli):
    code, _, err = cli("export-mergekit", adapters["pca"], "--scale", "1", "-o", tmp_path / "mk.yaml")
    assert_one_line_error(code, err, 3, "pca", "--via lora")
    assert not (tmp_path / "mk.yaml").exists() and not leftovers(tmp_path)
    code, _, err = cli("export-mergekit", adapters["pca"], "--scale", "1", "--via", "lora", "-o", tmp_path / "mk.yaml")
    assert code == 0, err


def test_cli_refuses_an_existing_output_without_overwrite(adapters, tmp_path, cli):
    target = tmp_path / "mk.yaml"
    target.write_text("keep me\n")
    code, _, err = cli("export-mergekit", adapters["rank1"], "--scale", "1", "-o", target)
    assert_one_line_error(code, err, 4, str(target), "--overwrite")
    assert target.read_text() == "keep me\n"


def test_cli_refuses_a_non_finite_scale(adapters, tmp_path, cli):
    code, _, err = cli("export-mergekit", adapters["rank1"], "--scale", "inf", "-o", tmp_path / "mk.yaml")
    assert_one_line_error(code, err, 3, "finite")


def test_cli_names_a_missing_recorded_checkpoint(adapters, run, tmp_path, cli):
    moved = tmp_path / "adapter"
    shutil.copytree(adapters["rank1"], moved)
    meta = json.loads((moved / "driftmerge.json").read_text())
    gone = str(tmp_path / "gone" / "checkpoint-200")
    meta["checkpoints"][1]["ref"] = gone
    (moved / "driftmerge.json").write_text(json.dumps(meta))
    code, _, err = cli("export-mergekit", moved, "--scale", "1", "-o", tmp_path / "mk.yaml")
    assert_one_line_error(code, err, 3, gone, "--via lora")
    code, _, err = cli("export-mergekit", moved, "--scale", "1", "--via", "lora", "-o", tmp_path / "mk.yaml")
    assert code == 0, err  # a LoRA merge reads only the base and the adapter


def test_cli_refuses_an_output_inside_an_input(adapters, tmp_path, cli):
    target = adapters["rank1"] / "mk.yaml"
    code, _, err = cli("export-mergekit", adapters["rank1"], "--scale", "1", "-o", target)
    assert_one_line_error(code, err, 4, "inside the input folder")
    assert not target.exists()


def test_cli_base_override(adapters, run, tmp_path, cli):
    """``--base``: a copy of the fitted base serves both merges; a base with other weights only the LoRA merge (a
    checkpoint merge would also move it by ``Σ w_i (W0 − W0')``)."""
    copy = tmp_path / "base-copy"
    shutil.copytree(run.base, copy)
    for via in ("checkpoints", "lora"):
        out = tmp_path / f"{via}.yaml"
        code, _, err = cli(
            "export-mergekit", adapters["rank1"], "--scale", "1", "--via", via, "--base", copy, "-o", out
        )
        assert code == 0, err
        assert f"base_model: {copy}\n" in out.read_text()
    other = run.checkpoints[0]  # the same architecture, other weights
    out = tmp_path / "other.yaml"
    code, _, err = cli("export-mergekit", adapters["rank1"], "--scale", "1", "--base", other, "-o", out)
    assert_one_line_error(code, err, 3, str(other), "--via lora")
    code, _, err = cli(
        "export-mergekit", adapters["rank1"], "--scale", "1", "--via", "lora", "--base", other, "-o", out
    )
    assert code == 0, err


def test_cli_refuses_a_checkpoint_merge_of_a_partial_adapter(run, tmp_path, cli):
    """An adapter fitted with --exclude leaves those tensors at the base; a checkpoint merge would move them."""
    extract(run.base, run.checkpoints, out_dir=tmp_path / "adapter", options=ExtractOptions(exclude="norm"))
    code, _, err = cli("export-mergekit", tmp_path / "adapter", "--scale", "1", "-o", tmp_path / "mk.yaml")
    assert_one_line_error(code, err, 3, "--exclude", "layernorm", "--via lora")
    code, _, err = cli(
        "export-mergekit", tmp_path / "adapter", "--scale", "1", "--via", "lora", "-o", tmp_path / "mk.yaml"
    )
    assert code == 0, err
