"""The console script: summaries, defaults, and bad input (one clear line, a non-zero code, nothing left)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import assert_one_line_error, leftovers
from safetensors.torch import load_file, save_file
from synthetic import make_run


def test_extract_and_apply_with_defaults(runs, tmp_path, monkeypatch, cli):
    run = runs["llama"]
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("extract", run.base, *run.checkpoints)
    assert code == 0, err
    for words in ("wrote", "tensors", "energy kept", "median R²", "adapter vs", "drift_extras.safetensors"):
        assert words in out
    assert (tmp_path / "driftmerge-adapter" / "adapter_model.safetensors").is_file()
    code, out, err = cli("apply", "--scale", "1.5")
    assert code == 0, err
    assert "scale 1.5 (step 450)" in out
    assert (tmp_path / "driftmerge-model" / "model.safetensors").is_file()
    code, out, err = cli("apply", "--step", "600", "--format", "adapter")
    assert code == 0, err
    assert (tmp_path / "driftmerge-adapter-scaled" / "adapter_config.json").is_file()


def test_demo_runs(cli, tmp_path):
    code, out, err = cli("demo", "--keep", tmp_path / "demo")
    assert code == 0, err
    assert "held-out greedy accuracy on 256 addition problems" in out
    acc = {}
    for row in ("base (step 0", "last checkpoint (step 600)", "extrapolated, scale 1.5 (step 900)"):
        acc[row] = float(next(x for x in out.splitlines() if row in x).split()[-1])
        assert 0.0 <= acc[row] <= 1.0
    run = json.loads((tmp_path / "demo" / "run" / "run.json").read_text())
    c = run["config"]  # the setting the heading names
    lr = f"{c['rl_lr']:g}".replace("e-0", "e-")  # 5e-5
    assert f"width {c['hidden']}, Adam {lr}, KL {c['kl_coef']:g}, {c['rl_steps']} steps" in out
    recorded = run["evals"]
    assert acc["base (step 0"] == pytest.approx(recorded[0]["accuracy"], abs=1e-3)  # what the recipe measured
    assert acc["last checkpoint (step 600)"] == pytest.approx(recorded[-1]["accuracy"], abs=1e-3)
    assert (tmp_path / "demo" / "driftmerge-model" / "config.json").is_file()
    # one line on what `analyze` finds and whether extrapolating helped, as the kept report and the table say
    finding = next(x for x in out.splitlines() if x.startswith("On this run `driftmerge analyze` finds"))
    model = json.loads((tmp_path / "demo" / "driftmerge-analysis" / "report.json").read_text())["model"]
    assert f"pooled R² {model['r2']:.2f}," in finding and f"rank-1 energy {model['energy_rank1']:.2f};" in finding
    verdict, said = re.search(r"scale 1\.5 (helped|did not help) \(([-+]\d\.\d{3}) against", finding).groups()
    gain = acc["extrapolated, scale 1.5 (step 900)"] - acc["last checkpoint (step 600)"]  # of the rounded figures
    assert float(said) == pytest.approx(gain, abs=1.1e-3) and (verdict == "helped") == (float(said) > 0)


def test_demo_without_matplotlib(tmp_path, monkeypatch):
    """`pip install -e .` has no plot extra: the demo still measures the run, and its report says why no figures."""
    from driftmerge.commands.demo import ANALYSIS, run_demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rep = run_demo(tmp_path / "demo")
    report = json.loads((tmp_path / "demo" / ANALYSIS / "report.json").read_text())
    assert rep.linearity == {k: report["model"][k] for k in ("r2", "elem_r2_median", "energy_rank1")}
    assert 0.5 < rep.linearity["r2"] <= 1.0
    assert not list((tmp_path / "demo" / ANALYSIS).glob("*.png"))
    assert "figures=False" in (tmp_path / "demo" / ANALYSIS / "report.md").read_text()
    assert rep.extrapolation_gain == rep.accuracy["extrapolated"] - rep.accuracy["last"]


def test_help_and_version(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "extract" in out and "Exit codes" in out
    code, out, _ = cli("--version")
    assert code == 0 and "driftmerge" in out


def test_missing_path(runs, tmp_path, cli):
    code, _, err = cli("extract", tmp_path / "nope", runs["llama"].checkpoints[0], "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "nope", "no such")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_folder_without_weights(runs, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("extract", runs["llama"].base, tmp_path / "empty", "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "empty", "no model weights")
    assert not (tmp_path / "out").exists()


def test_other_architecture_and_other_shape(runs, tmp_path, cli):
    code, _, err = cli("extract", runs["llama"].base, runs["qwen2"].checkpoints[0], "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "same architecture")
    wide = make_run(tmp_path / "wide", arch="llama", hidden=48, steps=(100,))
    code, _, err = cli("extract", runs["llama"].base, wide.checkpoints[0], "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "shape")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_tensor_in_one_checkpoint(runs, tmp_path, cli):
    run = runs["llama"]
    bad = tmp_path / "checkpoint-200"
    shutil.copytree(run.checkpoints[1], bad)
    w = load_file(str(bad / "model.safetensors"))
    w.pop("model.layers.1.mlp.up_proj.weight")
    save_file(w, str(bad / "model.safetensors"))
    code, _, err = cli("extract", run.base, run.checkpoints[0], bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "checkpoint-200", "model.layers.1.mlp.up_proj.weight")


def test_nan_and_identical_checkpoint(runs, tmp_path, cli):
    run = runs["llama"]
    bad = tmp_path / "checkpoint-300"
    shutil.copytree(run.checkpoints[2], bad)
    w = load_file(str(bad / "model.safetensors"))
    w["model.norm.weight"][3] = float("nan")
    save_file(w, str(bad / "model.safetensors"))
    code, _, err = cli("extract", run.base, bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, str(bad), "model.norm.weight", "NaN")
    bad_base = tmp_path / "base"
    shutil.copytree(run.base, bad_base)
    w = load_file(str(bad_base / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(w, str(bad_base / "model.safetensors"))
    code, _, err = cli("extract", bad_base, *run.checkpoints, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, str(bad_base), "model.layers.0.mlp.up_proj.weight", "NaN or Inf")
    same = tmp_path / "checkpoint-100"
    shutil.copytree(run.base, same)
    code, _, err = cli("extract", run.base, same, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "identical to the base")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_existing_output_is_refused_and_kept(runs, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("extract", runs["llama"].base, *runs["llama"].checkpoints, "-o", out)
    assert_one_line_error(code, err, 4, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = cli("extract", runs["llama"].base, *runs["llama"].checkpoints, "-o", out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "driftmerge.json").is_file()
    assert not leftovers(tmp_path)


def test_output_inside_an_input_is_refused(runs, tmp_path, cli):
    run = runs["llama"]
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", run.base / "adapter")
    assert_one_line_error(code, err, 4, "inside the input")
    assert not (run.base / "adapter").exists()


def test_bad_options(runs, tmp_path, cli):
    run = runs["llama"]
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "o", "--rank", "0")
    assert_one_line_error(code, err, 3, "--rank")
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "o", "--rank", "1.5")
    assert_one_line_error(code, err, 3, "(0, 1]")
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "o", "--steps", "1,2")
    assert_one_line_error(code, err, 3, "--steps gives 2 steps for 3 checkpoints")
    code, _, err = cli("extract", run.base, *run.checkpoints, "--rank", "abc")
    assert code == 2 and "Traceback" not in err
    code, _, err = cli("apply", tmp_path / "no-adapter", "--scale", "1")
    assert_one_line_error(code, err, 3, "no-adapter")
    code, _, err = cli("apply", tmp_path / "no-adapter", "--scale", "nan-ish")
    assert code == 2 and "Traceback" not in err
    code, _, err = cli("apply", "--scale", "1", "--step", "3")
    assert code == 2 and "exactly one" in err
    assert not (tmp_path / "o").exists()


def test_adapter_from_another_base(runs, tmp_path, cli):
    run = runs["llama"]
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "a")
    assert code == 0, err
    code, _, err = cli("apply", tmp_path / "a", "--scale", "1", "--base", runs["qwen2"].base, "-o", tmp_path / "m")
    assert_one_line_error(code, err, 3, "another base")
    assert not (tmp_path / "m").exists() and not leftovers(tmp_path)


def test_console_script_exit_code(tmp_path):
    """The installed entry point itself: no traceback, exit code 3, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "driftmerge_cli.main", "extract", str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_console_script_exits_quickly_with_the_commands_code_and_all_its_output(tmp_path):
    # entry() ends the process with os._exit after the command (skipping Python's slow shutdown): its exit code,
    # stdout written to a pipe and the one-line error must all still arrive
    ok = subprocess.run([sys.executable, "-m", "driftmerge", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("driftmerge, version")
    bad = subprocess.run(
        [sys.executable, "-m", "driftmerge", "extract", str(tmp_path / "nope"), "x", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 3 and bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "driftmerge", "extract"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage" in usage.stderr
