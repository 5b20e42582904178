"""What a newcomer meets in sweep, generate, recipes and apply's checks (issue 18): no deprecation warnings from
transformers' cache, a shipped prompts file for the demo's task and a documented sweep on it, usage errors, plurals,
the sweep table's counts and files, checks before the long part, and refusals of a negative scale or a checkpoint
as the base unless asked for."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shlex
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import pytest
from helpers import assert_one_line_error, load_weights

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.demo import DEMO_STEPS, copy_run
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.errors import InputError, OutputError
from driftmerge.evaluation.addition import accuracy, held_out, max_new_tokens
from driftmerge.evaluation.generation import LogitExtrapolation, SamplingOptions, generate
from driftmerge.io.models import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEPRECATED = re.compile(r"past_key_values|cache_params")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """What ``driftmerge demo --keep demo`` leaves that the sweep uses: demo/run/ (the shipped toy run) and
    demo/driftmerge-adapter (its rank-1 drift, as the demo extracts it)."""
    root = tmp_path_factory.mktemp("newcomer")
    run = copy_run(root / "demo")
    cks = [run / f"checkpoint-{s}" for s in DEMO_STEPS]
    extract(run / "base", cks, out_dir=root / "demo" / "driftmerge-adapter", options=ExtractOptions(rank=1))
    return root


@contextmanager
def no_cache_deprecation() -> Iterator[list[str]]:
    """Turn transformers' ``past_key_values`` deprecation warnings into errors, and collect what its logger says
    about it (its ``warning_once`` cache cleared, so an earlier test's warning does not hide this one's)."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    handler, logger = Collect(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*(past_key_values|cache_params)")
            yield said
    finally:
        logger.removeHandler(handler)
    assert not [m for m in said if DEPRECATED.search(m)], said


# ---- 1. the cache API transformers 5 wants -------------------------------------------------------------------------
def test_logit_extrapolation_prints_no_cache_deprecation(demo):
    run = demo / "demo" / "run"
    early, late = load_causal_lm(run / "base"), load_causal_lm(run / "checkpoint-600")
    tok = load_tokenizer(run / "base")
    prompts = ["4+22=", "13+4=", "7+70="]
    with no_cache_deprecation():
        far = generate(late, tok, prompts=prompts, opts=SamplingOptions(max_new_tokens=4), early=early, alpha=1.5)
        tok.padding_side = "left"  # the README's snippet
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        late.generate(
            **enc,
            logits_processor=[LogitExtrapolation(early, 1.5, enc["attention_mask"])],
            do_sample=True,
            temperature=0.6,
            top_p=0.95,
            max_new_tokens=4,
            pad_token_id=tok.pad_token_id,
        )
    one_by_one = [
        generate(late, tok, prompts=[p], opts=SamplingOptions(max_new_tokens=4), early=early, alpha=1.5)[0]
        for p in prompts
    ]
    assert far == one_by_one  # the cache still lines up with left padding


def test_generate_and_sweep_logits_commands_print_no_cache_deprecation(demo, cli, tmp_path):
    run = demo / "demo" / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in held_out(2, 2, seed=1)))
    with no_cache_deprecation():
        code, _, err = cli("generate", "--early", run / "base", "--late", run / "checkpoint-600", "--prompts", prompts,
                           "--max-new-tokens", "4", "-o", tmp_path / "g.jsonl")  # fmt: skip
        assert code == 0, err
        code, _, err = cli("sweep", demo / "demo" / "driftmerge-adapter", "--prompts", prompts, "--mode", "logits",
                           "--scales", "0,1.5", "--max-new-tokens", "4", "-o", tmp_path / "s")  # fmt: skip
        assert code == 0, err
    assert not DEPRECATED.search(err)


# ---- 2. a prompts file for the demo's task, and a documented sweep on it -------------------------------------------
def test_the_held_out_prompts_ship_with_the_demo_run(demo):
    shipped = resources.files("driftmerge") / "data" / "toy-rlvr" / "held-out.jsonl"
    rows = [json.loads(line) for line in shipped.read_text().splitlines()]
    cfg = json.loads((demo / "demo" / "run" / "run.json").read_text())["config"]
    want = held_out(cfg["eval_size"], cfg["digits"], seed=cfg["seed"])  # the problems the demo scores
    assert [(r["prompt"], r["answer"]) for r in rows] == want and len(rows) == 256
    assert (demo / "demo" / "run" / "held-out.jsonl").read_text() == shipped.read_text()  # demo --keep leaves it

    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["driftmerge"]
    assert any(fnmatch.fnmatch("data/toy-rlvr/held-out.jsonl", p) for p in patterns)  # pip install . carries it


def _doc_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "sweep.md").read_text()
    block = text.split("Sweep the demo's adapter on them:", 1)[1].split("```", 2)[1]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("driftmerge ")]


def test_the_documented_sweep_runs_on_the_demo(demo, cli, monkeypatch, tmp_path):
    """docs/sweep.md's example, on its first 12 prompts: scale 0 scores what the demo's scorer gives the base,
    scale 1.5 what it gives the model the demo writes at 1.5."""
    (keep, sweep) = _doc_commands()
    assert keep == ["driftmerge", "demo", "--keep", "demo"]  # the fixture leaves what the demo's run needs
    monkeypatch.chdir(demo)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(Path("demo/run/held-out.jsonl").read_text().splitlines(keepends=True)[:12]))
    args = sweep[1:]
    args[args.index("--prompts") + 1] = str(few)
    code, out, err = cli(*args, "--overwrite")
    assert code == 0, err
    report = json.loads(Path("demo/sweep/sweep.json").read_text())
    rows = {r["scale"]: r for r in report["rows"]}
    assert all(r["prompts"] == 12 and r["samples"] == 12 for r in rows.values())
    pairs = [(r["prompt"], r["answer"]) for r in map(json.loads, few.read_text().splitlines())]
    tok, n = load_tokenizer("demo/run/base"), max_new_tokens(2)
    assert rows[0.0]["mean"] == pytest.approx(accuracy(load_causal_lm("demo/run/base"), tok, pairs=pairs,
                                                       max_new_tokens=n))  # fmt: skip
    at = apply_drift("demo/driftmerge-adapter", tmp_path / "m", options=ApplyOptions(scale=1.5)).out_dir
    assert rows[1.5]["mean"] == pytest.approx(accuracy(load_causal_lm(at), tok, pairs=pairs, max_new_tokens=n))
    best = report["best"]["scale"]
    assert f"best scale {best:g}" in out and Path(args[args.index("--apply-best") + 1], "config.json").is_file()


# ---- 3-5. usage errors, plurals, the table, completions and checks before the sweep -------------------------------
def test_sweep_without_prompts_is_a_usage_error(demo, cli):
    code, _, err = cli("sweep", demo / "demo" / "driftmerge-adapter")
    assert code == 2 and "--prompts" in err and "Traceback" not in err
    code, _, err = cli("sweep", demo / "demo" / "driftmerge-adapter", "--eval-cmd", "x {model_dir}", "--prompts", "p")
    assert code == 2 and "leave out --prompts" in err


def test_step_counts_are_plural_only_when_more_than_one(cli, tmp_path):
    from driftmerge.io.checkpoints import resolve_steps

    with pytest.raises(InputError, match=r"--steps gives 1 step for 2 checkpoints$"):
        resolve_steps(["a/checkpoint-1", "a/checkpoint-2"], [5])
    with pytest.raises(InputError, match=r"--steps gives 2 steps for 1 checkpoint$"):
        resolve_steps(["a/checkpoint-1"], [5, 6])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extract: {base: b, checkpoints: [c, d], steps: [1]}\n")
    code, _, err = cli("run", "--dry-run", recipe)
    assert_one_line_error(code, err, 3, "steps gives 1 step for 2 checkpoints")


def test_sweep_table_counts_prompts_and_samples_and_completions_carry_prompt_and_answer(demo, cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in held_out(3, 2, seed=0)))
    sampling = ["--samples", "2", "--temperature", "1", "--max-new-tokens", "4"]
    adapter = demo / "demo" / "driftmerge-adapter"
    code, out, err = cli("sweep", adapter, "--prompts", prompts, "--scales", "0,1", *sampling, "-o", tmp_path / "s")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[-2:] == ["prompts", "samples"] and "n" not in header
    assert out.splitlines()[1].split()[-2:] == ["3", "6"]
    assert "± se: its standard error over prompts" in out
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "| prompts | samples |" in md and "standard error over prompts" in md
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert all(r["prompts"] == 3 and r["samples"] == 6 for r in rows)
    comps = [json.loads(line) for line in (tmp_path / "s" / "completions.jsonl").read_text().splitlines()]
    recs = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(comps) == 2 * 3 * 2
    for c in comps:
        assert c["prompt"] == recs[c["prompt_index"]]["prompt"] and c["answer"] == recs[c["prompt_index"]]["answer"]


@pytest.fixture
def no_sweep(monkeypatch):
    """A sweep that must not start: the checks before it are what is tested."""
    import driftmerge.commands.sweep as sweep

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep ran before its outputs were checked")

    monkeypatch.setattr(sweep, "run_sweep", refuse)


def test_apply_best_is_checked_before_the_sweep(demo, cli, tmp_path, no_sweep):
    adapter, base = demo / "demo" / "driftmerge-adapter", demo / "demo" / "run" / "base"
    prompts = demo / "demo" / "run" / "held-out.jsonl"
    sweep = ["sweep", adapter, "--prompts", prompts, "-o", tmp_path / "report"]
    (tmp_path / "taken").mkdir()
    code, _, err = cli(*sweep, "--apply-best", tmp_path / "taken")
    assert_one_line_error(code, err, 4, "taken: already exists")
    code, _, err = cli(*sweep, "--apply-best", base / "best")  # inside the recorded base
    assert_one_line_error(code, err, 4, "lies inside the input", str(base.resolve()))
    (tmp_path / "a-file").write_text("")
    code, _, err = cli(*sweep, "--apply-best", tmp_path / "a-file" / "best")
    assert_one_line_error(code, err, 4, "a-file/best: cannot create it", "is not a folder")
    code, _, err = cli(*sweep, "--apply-best", tmp_path / "report" / "model")
    assert_one_line_error(code, err, 4, "--apply-best and the report folder", "overlap")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = cli(*sweep, "--apply-best", locked / "best")
        assert_one_line_error(code, err, 4, "permission denied")
    assert not (tmp_path / "report").exists()


def test_sweep_preflight_also_writes_nothing_when_it_passes(demo, tmp_path):
    from driftmerge.commands.sweep import preflight

    adapter = demo / "demo" / "driftmerge-adapter"
    preflight(adapter, base=None, out=tmp_path / "r", apply_best=tmp_path / "deep" / "m", overwrite=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="overlap"):
        preflight(adapter, base=None, out=tmp_path / "r", apply_best=tmp_path / "r", overwrite=True)


# ---- 6. a recipe's dry run checks its inputs -----------------------------------------------------------------------
def test_dry_run_names_every_missing_input_in_one_line(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", ROOT / "recipes" / "extrapolate.yaml", "--dry-run")
    cks = [f"extract.checkpoints[{i}] demo-run/run/checkpoint-{s}" for i, s in enumerate(DEMO_STEPS)]
    assert_one_line_error(code, err, 3, "extrapolate.yaml: missing inputs", "extract.base demo-run/run/base", *cks)
    assert "apply.adapter" not in err  # the extract stage writes it

    recipe = tmp_path / "r.yaml"
    (tmp_path / "here").mkdir()
    recipe.write_text(
        "extract: {base: org/base@main, checkpoints: [here, 'org/name@bad rev']}\n"
        "apply: {adapter: gone, scale: 1}\n"
        "push: {folder: nowhere, repo_id: org/x, dry_run: true}\n"
    )
    code, _, err = cli("run", "--dry-run", recipe)
    assert_one_line_error(code, err, 3, "r.yaml: missing inputs", "extract.checkpoints[1] org/name@bad rev",
                          "apply.adapter gone", "push.folder nowhere")  # fmt: skip
    assert "extract.base" not in err and "checkpoints[0]" not in err  # a Hub id, a folder that is there

    recipe.write_text(f"extract: {{base: {tmp_path / 'gone'}, run_dir: {{path: {tmp_path / 'no-run'}}}}}\n")
    code, _, err = cli("run", "--dry-run", recipe)
    assert_one_line_error(code, err, 3, "extract.base", "extract.run_dir.path")

    recipe.write_text("extract: {base: here, checkpoints: [here]}\n")
    code, out, err = cli("run", "--dry-run", recipe)
    assert code == 0 and "1 stage, equivalent to" in out, err


# ---- 7. a negative scale and a checkpoint as the base need a flag --------------------------------------------------
def test_a_negative_scale_needs_its_flag(demo, cli, tmp_path):
    adapter = demo / "demo" / "driftmerge-adapter"
    code, _, err = cli("apply", adapter, "--scale", "-1", "-o", tmp_path / "m")
    assert_one_line_error(code, err, 3, "--scale -1 moves the base against the training", "--step",
                          "--allow-negative-scale")  # fmt: skip
    code, _, err = cli("apply", adapter, "--step", "-150", "-o", tmp_path / "m")
    assert_one_line_error(code, err, 3, "--step -150 (scale -0.25)", "--allow-negative-scale")
    code, _, err = cli("apply", adapter, "--scale", "-1", "--format", "adapter", "-o", tmp_path / "m")
    assert_one_line_error(code, err, 3, "--allow-negative-scale")
    assert not (tmp_path / "m").exists()
    code, out, err = cli("apply", adapter, "--scale", "-1", "--allow-negative-scale", "-o", tmp_path / "m")
    assert code == 0 and "scale -1 (step -600)" in out, err
    code, out, _ = cli("apply", "--help")
    assert "--allow-negative-scale" in out and "moves the base against the training" in " ".join(out.split())

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"apply: {{adapter: {adapter}, scale: -0.5, output: {tmp_path / 'rm'}}}\n")
    code, _, err = cli("run", recipe)  # refused before anything runs
    assert_one_line_error(code, err, 3, "apply: --scale -0.5", "allow_negative_scale: true")
    recipe.write_text(recipe.read_text().replace("scale: -0.5", "scale: -0.5, allow_negative_scale: true"))
    code, _, err = cli("run", recipe)
    assert code == 0, err


def test_a_checkpoint_as_the_base_needs_its_flag(demo, cli, tmp_path):
    adapter, run = demo / "demo" / "driftmerge-adapter", demo / "demo" / "run"
    ck = run / "checkpoint-600"
    code, _, err = cli("apply", adapter, "--scale", "0.5", "--base", ck, "-o", tmp_path / "m")
    assert_one_line_error(code, err, 3, "the run's checkpoint at step 600, not the base", "twice",
                          "--allow-other-base")  # fmt: skip
    assert not (tmp_path / "m").exists()
    code, _, err = cli("apply", adapter, "--scale", "0.5", "--base", ck, "--allow-other-base", "-o", tmp_path / "m")
    assert code == 0, err
    w0, w = load_weights(ck), load_weights(tmp_path / "m")
    assert any(not (w0[k] == w[k]).all() for k in w0)  # moved from the checkpoint, as asked
    code, out, _ = cli("apply", "--help")
    assert "--allow-other-base" in out and "counts the drift it already holds twice" in " ".join(out.split())

    prompts = run / "held-out.jsonl"
    code, _, err = cli("sweep", adapter, "--prompts", prompts, "--base", ck, "-o", tmp_path / "s")
    assert_one_line_error(code, err, 3, "checkpoint at step 600", "--allow-other-base")
    assert not (tmp_path / "s").exists()
