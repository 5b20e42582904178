"""What `driftmerge analyze` says it measured: sample sizes and their warning, the steps of an adapter-only report,
one checkpoint (no R²), every tensor in the heatmaps' data, the trajectory line through the base, one meaning per
R² (the number `extract` prints is the median of the per-tensor pooled R²)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic import make_run

from driftmerge.commands.analyze import AnalyzeOptions, analyze
from driftmerge.core.linearity import MIN_SAMPLE, heatmap, summarize, tensor_stats
from driftmerge.reports import linearity_figures
from driftmerge.reports.linearity_figures import trajectory_data
from driftmerge.schema import read_meta

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "report.schema.json").read_text())
STEPS = (100, 200, 300, 400)
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A curved, noisy llama run (untied embeddings and lm_head): 4 checkpoints."""
    return make_run(tmp_path_factory.mktemp("run"), steps=STEPS, noise=0.05, curvature=0.3, seed=2)


def _validate(report: dict) -> None:
    pytest.importorskip("jsonschema").validate(report, SCHEMA)


def test_each_tensor_samples_at_least_the_floor_or_all_of_it(run, tmp_path):
    """At the default 1e-3 a 32×64 tensor gave 2 elements; now at least MIN_SAMPLE, or every element when fewer."""
    res = analyze(run.base, run.checkpoints, out_dir=tmp_path / "rep")
    for name, e in res.report["tensors"].items():
        assert e["elem_sampled"] == min(math.prod(e["shape"]), MIN_SAMPLE), name
    m = res.report["model"]
    assert m["elem_sampled"] == sum(e["elem_sampled"] for e in res.report["tensors"].values())
    assert m["elem_count"] >= 0.8 * m["elem_sampled"] and not res.report["notes"]  # no small-sample warning
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{m['elem_sampled']:,} of {m['elem_numel']:,} elements" in md and f"{m['elem_count']:,}" in md
    _validate(res.report)


def test_a_small_sample_prints_its_size_and_a_warning(run, tmp_path, cli):
    code, out, err = cli(
        "analyze", run.base, *run.checkpoints, "-o", tmp_path / "rep", "--sample-frac", "0.001", "--min-sample", "4"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = report["model"]
    assert m["elem_sampled"] == 4 * len(report["tensors"]) and 0 < m["elem_count"] < 200
    head = out.splitlines()[0].split()
    assert "elements" in head
    model_row = next(line for line in out.splitlines() if line.startswith("model "))
    assert f"{m['elem_count']} *" in model_row  # the size, flagged
    assert "Warning: per-element R² marked * rests on fewer than 200 sampled elements" in out
    assert "--min-sample" in out and f"{m['elem_sampled']:,} of {m['elem_numel']:,} elements" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "> Warning: per-element R² marked *" in md and f"| {m['elem_count']} * |" in md
    _validate(report)


def test_an_adapter_alone_reports_the_fitted_steps_and_no_none(run, tmp_path, cli):
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "ad")[0] == 0
    code, out, err = cli("analyze", tmp_path / "ad", "-o", tmp_path / "rep")
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert report["steps"] == list(STEPS) and [c["step"] for c in report["checkpoints"]] == list(STEPS)
    assert "4 checkpoints at steps 100, 200, 300, 400" in md
    assert "None" not in md and "None" not in out
    assert "elem R²" not in out and "need the checkpoints" in out  # no per-element columns to leave blank
    assert report["model"]["delta_norms"] == [] and report["model"]["projection"] == []
    meta = read_meta(tmp_path / "ad" / "driftmerge.json")  # the median extract prints, named as such
    assert report["model"]["r2_tensor_median"] == pytest.approx(meta.summary.median_r2, abs=1e-12)
    assert f"median over tensors: here {meta.summary.median_r2:.3f}" in " ".join(out.split())  # wrapped lines
    _validate(report)


def test_one_checkpoint_says_once_that_r2_needs_two(run, tmp_path, cli):
    code, out, err = cli("analyze", run.base, run.checkpoints[-1], "-o", tmp_path / "rep")
    assert code == 0, err
    assert out.count("R² needs two or more checkpoints (plus the base)") == 1
    assert "R² pooled" not in out and "elem R²" not in out  # no all-n/a columns
    assert "rank-1 energy" in out and "3 left out" in out
    folder = tmp_path / "rep"
    md = (folder / "report.md").read_text()
    assert md.count("R² needs two or more checkpoints") == 1
    for key in ("r2_heatmap", "element_r2_hist", "trajectory_projection"):
        assert not (folder / f"{key}.png").exists() and f"not drawn: {key}:" in md
    assert (folder / "rank1_energy_heatmap.png").exists() and (folder / "drift_norm_vs_step.png").exists()
    report = json.loads((folder / "report.json").read_text())
    assert report["model"]["r2"] is None and report["notes"][0].startswith("R² needs two")
    _validate(report)


def test_heatmaps_hold_every_tensor_embeddings_lm_head_and_norms_included(run, tmp_path, monkeypatch):
    drawn = {}

    def spy(stats, value):
        drawn[value] = heatmap(stats, value)
        return drawn[value]

    monkeypatch.setattr(linearity_figures, "heatmap", spy)
    res = analyze(run.base, run.checkpoints, out_dir=tmp_path / "rep")
    tensors = res.report["tensors"]
    r2 = drawn["r2"]
    assert r2.others == list(OUTSIDE)  # embeddings first, lm_head last
    assert "input_layernorm" in r2.types and "post_attention_layernorm" in r2.types and "self_attn.q_proj" in r2.types
    cells = sum(v is not None for row in r2.grid for v in row) + len(r2.others)
    assert cells == len(tensors)  # every fitted tensor, once
    for name, v in zip(r2.others, r2.other_values, strict=True):
        assert v == pytest.approx(tensors[name]["r2"], abs=1e-12)
    col = r2.types.index("input_layernorm")
    assert r2.grid[1][col] == pytest.approx(tensors["model.layers.1.input_layernorm.weight"]["r2"], abs=1e-12)
    energy = drawn["energy"]  # 2-D weights only: the embeddings and lm_head, not the norms
    assert energy.others == ["model.embed_tokens.weight", "lm_head.weight"] and "input_layernorm" not in energy.types
    assert energy.other_values[1] == pytest.approx(tensors["lm_head.weight"]["energy_top"]["1"], abs=1e-12)
    assert {"r2_heatmap", "rank1_energy_heatmap"} <= set(res.figures)


def test_a_heatmap_cell_pools_the_tensors_it_holds():
    """MoE experts of one layer share a cell: their pooled R² (sums over the tensors), not the last one's."""
    g = torch.Generator().manual_seed(3)
    t = [1.0, 2.0, 3.0]
    stats = []
    for e, bend in enumerate((0.0, 2.0)):
        d = torch.randn(8, 4, generator=g)
        deltas = [d * x + bend * x * x * torch.randn(8, 4, generator=g) for x in t]
        stats.append(tensor_stats(f"model.layers.0.mlp.experts.{e}.up_proj.weight", deltas, t=t))
    hm = heatmap(stats, "r2")
    assert hm.layers == ["0"] and hm.types == ["mlp.experts.up_proj"] and hm.others == []
    assert hm.grid[0][0] == pytest.approx(summarize(stats)["r2"]) and stats[0].r2 != pytest.approx(stats[1].r2)


def test_the_trajectory_line_is_extracts_line_through_the_base(run, tmp_path, cli):
    res = analyze(run.base, run.checkpoints, out_dir=tmp_path / "rep", options=AnalyzeOptions(min_sample=10))
    traj = trajectory_data(res.report)
    assert traj is not None and traj["ends"] == [0, STEPS[-1]] and traj["steps"] == [0, *STEPS]
    assert traj["projection"][0] == 0.0
    base, free = traj["lines"]["base"], traj["lines"]["free"]
    assert base[0] == 0.0  # through the base
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "ad")[0] == 0
    meta = read_meta(tmp_path / "ad" / "driftmerge.json")
    drift = math.sqrt(sum(r.drift_norm**2 for r in meta.tensors.values()))  # ‖D‖ of extract's lsq drift
    assert base[1] == pytest.approx(drift, rel=1e-5)  # scale 1 lands where extract's drift does
    model = res.report["model"]
    assert model["projection_base_line"]["slope"] == pytest.approx(drift / STEPS[-1], rel=1e-5)
    assert abs(free[0]) > 1e-3 * drift  # the free line has an intercept: a different line, drawn apart
    assert "trajectory_projection" in res.figures
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**projection r²** (trajectory figure)" in md and f"{model['projection_line']['r2']:.3f}" in md


def test_the_console_explains_each_r2_it_prints(run, tmp_path, cli):
    code, out, err = cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "rep")
    assert code == 0, err
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "ad")[0] == 0
    median = read_meta(tmp_path / "ad" / "driftmerge.json").summary.median_r2
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"]["r2_tensor_median"] == pytest.approx(median, abs=1e-5)  # Gram sums vs running float32 sums
    text = " ".join(out.split())
    assert "R² pooled: the share of the weights' movement" in text
    assert "elem R²: the same r² for single elements, on a seeded sample" in text
    assert f"prints the median over tensors: here {median:.3f}" in text
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## What the R² figures mean" in md and "**projection r²** (trajectory figure)" in md
