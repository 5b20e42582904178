"""`driftmerge analyze` on planted trajectories whose answers are known, the report's schema, figures, log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, load_weights
from synthetic import make_run

from driftmerge.commands.analyze import AnalyzeOptions, analyze
from driftmerge.core.linearity import element_r2, sample_indices, tensor_stats
from driftmerge.core.trajectory import pooled_r2, pooled_sums

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "report.schema.json").read_text())
STEPS = (100, 200, 300, 400)


def dense_r2(base: dict, cks: list[dict], t: list[float], name: str) -> tuple[float, np.ndarray]:
    """Pooled and per-element R² of one tensor with numpy, every element, points = base + checkpoints."""
    y = np.stack([np.zeros(base[name].numel())] + [(c[name] - base[name]).double().numpy().ravel() for c in cks])
    ts = np.array([0.0, *t])[:, None]
    yc, tc = y - y.mean(0), ts - ts.mean()
    ss_tot = (yc**2).sum(0)
    s_ty = (tc * yc).sum(0)
    explained = s_ty**2 / (tc**2).sum()
    pooled = 1 - (ss_tot - explained).sum() / ss_tot.sum()
    return float(pooled), explained / np.maximum(ss_tot, 1e-300)


def test_linear_trajectory_has_r2_one_and_rank1_energy_one(tmp_path):
    run = make_run(tmp_path / "run", steps=STEPS, noise=0.0)
    res = analyze(run.base, run.checkpoints, out_dir=tmp_path / "rep", options=AnalyzeOptions(sample_frac=0.2))
    m = res.report["model"]
    assert m["r2"] > 0.99999 and m["elem_r2_median"] > 0.9999 and m["elem_r2_share_above"] == 1.0
    assert m["energy_rank1"] > 0.9999  # the planted drift is rank 1 in every matrix
    assert res.report["model"]["projection_line"]["r2"] > 0.99999
    for name, e in res.report["tensors"].items():
        assert all(c > 0.9999 for c in e["step_cosines"]), name  # one direction all along
        if len(e["shape"]) == 2:
            assert e["energy_top"]["1"] > 0.9999


def test_curved_trajectory_matches_a_dense_numpy_computation(tmp_path):
    run = make_run(tmp_path / "run", steps=STEPS, noise=0.02, curvature=0.6, seed=4)
    res = analyze(
        run.base, run.checkpoints, out_dir=tmp_path / "rep", options=AnalyzeOptions(sample_frac=0.5, min_move=0.0)
    )
    base, cks = load_weights(run.base), [load_weights(c) for c in run.checkpoints]
    t = [float(s) for s in STEPS]
    assert res.report["model"]["r2"] < 0.99  # visibly below the straight line's 1
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        pooled, per_elem = dense_r2(base, cks, t, name)
        e = res.report["tensors"][name]
        assert e["r2"] == pytest.approx(pooled, abs=1e-5)
        assert e["elem_r2_median"] == pytest.approx(float(np.median(per_elem)), abs=0.03)  # a 50 % sample
        d = [(c[name] - base[name]).double().ravel() for c in cks]  # the one R² extract and analyze record
        sd, std = sum(d), sum(ti * di for ti, di in zip(t, d, strict=True))
        sums = pooled_sums(t, sum_sq_norms=float(sum(x @ x for x in d)), sq_norm_sum=float(sd @ sd),
                           sq_norm_tsum=float(std @ std), dot_tsum_sum=float(std @ sd))  # fmt: skip
        assert pooled_r2(*sums) == pytest.approx(pooled, abs=1e-9)


@pytest.mark.parametrize(("frac", "min_count", "size"), [(1.0, 1, 500), (0.2, 1, 100), (1e-3, 300, 300)])
def test_element_r2_on_the_sample_is_exact_for_those_elements(frac, min_count, size):
    """frac 1 takes every element, in order; a smaller sample (at least ``min_count``) draws distinct elements."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(500, generator=g) * k + 0.1 * torch.randn(500, generator=g) for k in (1.0, 2.0, 3.5)]
    r2, count = element_r2(deltas, [1, 2, 3], frac=frac, min_move=0.0, seed=9, min_count=min_count)
    idx = sample_indices(500, size, seed=9)
    assert len(set(idx.tolist())) == size and (size < 500 or idx.tolist() == list(range(500)))
    y = np.stack([np.zeros(size)] + [d[idx].double().numpy() for d in deltas])
    want = [np.corrcoef([0, 1, 2, 3], y[:, i])[0, 1] ** 2 for i in range(size)]
    assert count == size and np.allclose(r2, want, atol=1e-9)


def test_flat_spectrum_energy_matches_the_exact_singular_values():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(120, 90, generator=g) * (k + 1) for k in range(3)]  # white noise: no dominant direction
    s = tensor_stats("model.layers.0.mlp.down_proj.weight", deltas, t=[1, 2, 3], spectrum=8)
    drift = sum(d * ti for d, ti in zip(deltas, [1, 2, 3], strict=True)) * (3 / 14)
    sv = torch.linalg.svdvals(drift).double().pow(2)
    for r, share in s.energy_top.items():
        assert share == pytest.approx(float(sv[:r].sum() / sv.sum()), abs=1e-3)
    assert s.energy_top[1] < 0.1 and set(s.energy_top) == {1, 2, 4, 8}


def test_report_validates_and_figures_show_data(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from matplotlib import image

    run = make_run(tmp_path / "run", steps=STEPS, noise=0.05, curvature=0.2)
    res = analyze(run.base, run.checkpoints, out_dir=tmp_path / "rep")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert set(res.figures) == {
        "r2_heatmap",
        "element_r2_hist",
        "rank1_energy_heatmap",
        "drift_norm_vs_step",
        "trajectory_projection",
    }
    for f in res.figures.values():
        pixels = image.imread(tmp_path / "rep" / f)  # (H, W, 4) floats in [0, 1]
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and float(pixels[..., :3].std()) > 0.05
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Summary" in md and "![r2_heatmap](r2_heatmap.png)" in md and "up_proj" in md


def test_cli_prints_a_table_and_renders_an_adapter(tmp_path, cli):
    run = make_run(tmp_path / "run", steps=STEPS, noise=0.05)
    code, out, err = cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "rep")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["group", "tensors", "R²"] and "model" in out and "5 figures" in out
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "ad")[0] == 0
    code, out, err = cli("analyze", tmp_path / "ad", "-o", tmp_path / "rep-ad")
    assert code == 0, err
    report = json.loads((tmp_path / "rep-ad" / "report.json").read_text())
    assert report["source"] == "adapter" and report["model"]["energy_rank1"] > 0.5
    pytest.importorskip("jsonschema").validate(report, SCHEMA)
    code, _, err = cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "x", "--sample-frac", "2")
    assert_one_line_error(code, err, 3, "--sample-frac")
    assert not (tmp_path / "x").exists()


def _tiny_tokenizer(folder: Path, vocab: int = 64) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", *[chr(c) for c in range(ord("a"), ord("z") + 1)], *map(str, range(10))]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


def test_logprob_linearity_runs_and_scores_like_a_manual_forward(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from driftmerge.evaluation.logprobs import response_logprobs

    run = make_run(tmp_path / "run", steps=STEPS, noise=0.0, drift_rms=2e-2)
    _tiny_tokenizer(run.base)
    pairs = [{"prompt": "a b c", "response": "d e f g"}, {"prompt": "1 2", "response": "3 4 5"}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    code, out, err = cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "rep", "--logprobs", jsonl)
    assert code == 0, err
    lp = json.loads((tmp_path / "rep" / "report.json").read_text())["logprobs"]
    assert lp["pairs"] == 2 and lp["tokens"] == 7 and len(lp["mean_logprob"]) == 1 + len(STEPS)
    assert 0 <= lp["kept"] <= 7 and all(0 <= r <= 1 for r in lp["r2_values"]) and "log-probs:" in out

    tok = AutoTokenizer.from_pretrained(run.base)  # the oracle: one unbatched forward pass per pair
    model = AutoModelForCausalLM.from_pretrained(run.checkpoints[-1], dtype=torch.float32).eval()
    want = []
    for p in pairs:
        prompt = tok(p["prompt"])["input_ids"]
        resp = tok(p["response"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + resp])).logits[0], -1)
        want += [float(logp[len(prompt) + k - 1, r]) for k, r in enumerate(resp)]
    got = response_logprobs(run.checkpoints[-1], pairs, tokenizer=tok, device=torch.device("cpu"), batch_size=2)
    assert np.allclose(got.numpy(), want, atol=1e-5)


def test_bad_pairs_file_is_one_clear_line(tmp_path, cli):
    run = make_run(tmp_path / "run", steps=STEPS)
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    code, _, err = cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "rep", "--logprobs", bad)
    assert_one_line_error(code, err, 3, "pairs.jsonl:1", "'response'")
    assert not (tmp_path / "rep").exists()
