"""YAML recipes (``driftmerge run``): every shipped recipe validates and is commented; bad recipes give one line."""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from driftmerge.commands.demo import copy_run
from driftmerge.commands.options import MIN_MEMORY, ApplyOptions, ExtractOptions
from driftmerge.commands.recipe_schema import ApplyStage, ExtractStage
from driftmerge.commands.recipes import Recipe, load_recipe, plan, run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
KEY_LINE = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w-]*:(?:\s|$)")


@pytest.fixture
def write(tmp_path):
    """Write a recipe file into tmp_path and return its path."""

    def make(text: str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return make


def test_the_shipped_recipes_exist():
    assert {"extrapolate.yaml", "trl-run-dir.yaml", "hub-publish.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_says_how_to_run_it(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and plan(recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and f"driftmerge run recipes/{path.name}" in first


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_key_of_a_recipe_has_a_comment(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if KEY_LINE.match(line):
            above = lines[i - 1].strip() if i else ""
            assert "#" in line or above.startswith("#"), f"{path.name}:{i + 1}: no comment for {line.strip()!r}"


def test_recipe_keys_follow_the_library():
    assert set(ExtractOptions.model_fields) <= set(ExtractStage.model_fields)
    assert set(ApplyOptions.model_fields) <= set(ApplyStage.model_fields)


def test_the_command_line_and_the_recipe_enforce_the_one_memory_floor(write, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("b", "c"):  # a dry run checks that the inputs exist
        (tmp_path / name).mkdir()
    too_small = MIN_MEMORY - 1
    code, _, err = cli("run", "--dry-run", write(f"extract: {{base: b, checkpoints: [c], max_memory: {too_small}}}\n"))
    assert_one_line_error(code, err, 3, f"extract.max_memory: must be at least {MIN_MEMORY >> 20} MiB")
    code, _, err = cli("extract", "b", "c", "-o", tmp_path / "o", "--max-memory", str(too_small))
    assert_one_line_error(code, err, 3, f"--max-memory must be at least {MIN_MEMORY >> 20} MiB")
    assert cli("run", "--dry-run", write(f"extract: {{base: b, checkpoints: [c], max_memory: {MIN_MEMORY}}}\n"))[0] == 0


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("rnak: 1\n", ["unknown key rnak", "allowed: extract, apply, push"]),
        ("extract: {base: b, checkpoints: [c], rnak: 2}\n", ["unknown key extract.rnak", "allowed: base,"]),
        ("extract: {base: b, run_dir: {path: r, evry: 2}}\n", ["unknown key extract.run_dir.evry", "every"]),
        ("apply: {adapter: a, scale: 1, sacle: 2}\n", ["unknown key apply.sacle"]),
    ],
)
def test_unknown_keys_are_named(text, fragments, write, cli):
    code, _, err = cli("run", write(text))
    assert_one_line_error(code, err, 3, "r.yaml: ", *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("extract: {base: b, checkpoints: c}\n", ["extract.checkpoints: must be a valid list, got a string"]),
        ("extract: {base: b, checkpoints: [c], seed: x, rank: 0}\n", ["extract.rank: must be", "; extract.seed:"]),
        ("extract: {base: b, checkpoints: [c], rank: 1.5}\n", ["extract.rank:", "(0, 1]"]),
        ("extract: {base: b, checkpoints: [c], fit: lqs}\n", ["extract.fit:", "'lsq'"]),
        ("extract: {base: b, checkpoints: [c], max_memory: 1MB}\n", ["extract.max_memory: must be at least 64 MiB"]),
        ("extract: {base: b}\n", ["extract: give exactly one of checkpoints", "run_dir"]),
        ("extract: {base: b, checkpoints: [c], run_dir: {path: r}}\n", ["extract: give exactly one of checkpoints"]),
        ("extract: [b]\n", ["extract: must be a mapping of keys, got a list"]),
        ("apply: {adapter: a, scale: 1, step: 2}\n", ["apply: give exactly one of scale or step"]),
        ("apply: {adapter: a}\n", ["apply: give exactly one of scale or step"]),
        ("apply: {adapter: a, scale: .inf}\n", ["apply.scale: must be a finite number"]),
        ("apply: {scale: 1}\n", ["apply.adapter: required when the recipe has no extract stage"]),
        ("push: {repo_id: org/name@main}\n", ["push.repo_id: must be a Hub repo id"]),
        ("extract: null\n", ["give at least one stage"]),
    ],
)
def test_bad_values_give_one_line(text, fragments, write, cli):
    code, _, err = cli("run", "--dry-run", write(text))
    assert_one_line_error(code, err, 3, "r.yaml: ", *fragments)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("extract: {base: b\n", "not valid YAML (line 2"),
        ("extract:\n  base: a\n  base: b\n", "key 'base' is given twice"),
        ("", "the recipe is empty"),
        ("- extract\n", "a recipe is a mapping of stages"),
    ],
)
def test_bad_files_give_one_line(text, fragment, write, cli):
    code, _, err = cli("run", write(text))
    assert_one_line_error(code, err, 3, "r.yaml: ", fragment)


def test_missing_recipe(tmp_path, cli):
    code, _, err = cli("run", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, 3, "nope.yaml: no such recipe file")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    copy_run(tmp_path / "demo-run")  # a dry run checks that the inputs exist
    code, out, err = cli("run", ROOT / "recipes" / "extrapolate.yaml", "--dry-run")
    assert code == 0, err
    assert "driftmerge extract demo-run/run/base demo-run/run/checkpoint-150 demo-run/run/checkpoint-300" in out
    assert "driftmerge apply demo-run/extrapolate-adapter --scale 1.5 -o demo-run/extrapolate-model" in out
    assert "nothing was run or written" in out
    assert list(tmp_path.iterdir()) == [tmp_path / "demo-run"]
    assert list((tmp_path / "demo-run").iterdir()) == [tmp_path / "demo-run" / "run"]


def test_extrapolate_recipe_equals_the_commands_it_plans(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    copy_run(tmp_path / "demo-run")  # what `driftmerge demo --keep demo-run` leaves in demo-run/run
    path = ROOT / "recipes" / "extrapolate.yaml"
    code, out, err = cli("run", path)
    assert code == 0, err
    assert "[1/2] extract" in out and "wrote model demo-run/extrapolate-model" in out
    assert "scale 1.5 (step 900)" in out

    recipe = load_recipe(path)  # the same plan, with other outputs, through `driftmerge extract` / `apply`
    recipe.extract.output, recipe.apply.adapter, recipe.apply.output = "cli-adapter", "cli-adapter", "cli-model"
    for line in plan(recipe):
        code, _, err = cli(*shlex.split(line)[1:])
        assert code == 0, err
    ours, theirs = tmp_path / "demo-run" / "extrapolate-adapter", tmp_path / "cli-adapter"
    assert (ours / "adapter_model.safetensors").read_bytes() == (theirs / "adapter_model.safetensors").read_bytes()
    shards = sorted(p.name for p in (tmp_path / "cli-model").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "demo-run" / "extrapolate-model").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "demo-run" / "extrapolate-model" / name).read_bytes() == (
            tmp_path / "cli-model" / name
        ).read_bytes()


def test_run_dir_selection(runs, tmp_path, write):
    run_dir = Path(runs["llama"].base).parent  # base/ and checkpoint-100/-200/-300/
    text = f"extract:\n  base: {runs['llama'].base}\n  run_dir: {{path: {run_dir}, every: 100, last: 2}}\n"
    path = write(text + f"  output: {tmp_path / 'a'}\n")
    recipe = load_recipe(path)
    assert f"--run-dir {run_dir} --every 100 --last 2" in plan(recipe)[0]
    (done,) = run_recipe(recipe)
    assert [c.step for c in done.result.meta.checkpoints] == [200, 300]


def test_existing_output_stops_the_job_before_it_starts(tmp_path, monkeypatch, write, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    path = write("extract: {base: b, checkpoints: [c], output: adapter}\napply: {scale: 1.5, output: model}\n")
    code, _, err = cli("run", path)
    assert_one_line_error(code, err, 4, "model: already exists", "set apply.overwrite: true")
    assert not (tmp_path / "adapter").exists()


@pytest.fixture
def stub_publish(monkeypatch):
    """A stand-in ``driftmerge.hub.publish.push_folder`` (no network, whatever publish.py holds) and a token."""
    import huggingface_hub

    calls = []
    fake = types.ModuleType("driftmerge.hub.publish")
    fake.LOGIN = "log in"
    fake.require_token = lambda repo_id: None
    fake.push_folder = lambda folder, repo_id, **kw: calls.append((Path(folder), repo_id, kw)) or f"pushed {repo_id}"
    monkeypatch.setitem(sys.modules, "driftmerge.hub.publish", fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return calls


def test_push_stage_calls_push_folder(tmp_path, write, stub_publish):
    path = write(f"push:\n  folder: {tmp_path}\n  repo_id: org/name\n  private: true\n  create_pr: true\n")
    recipe = load_recipe(path)
    assert plan(recipe) == [f"driftmerge push {tmp_path} org/name --private --create-pr"]
    (done,) = run_recipe(recipe)
    assert done.result == "pushed org/name"
    kw = {"private": True, "revision": None, "create_pr": True, "dry_run": False, "analysis": None}
    assert stub_publish == [(tmp_path, "org/name", kw)]


def test_push_to_hub_pushes_what_its_stage_wrote(runs, tmp_path, write, stub_publish):
    run = runs["llama"]
    text = f"extract:\n  base: {run.base}\n  checkpoints: [{run.checkpoints[-1]}]\n  output: {tmp_path / 'a'}\n"
    recipe = load_recipe(write(text + "  push_to_hub: org/a\n  hub_private: true\n"))
    assert plan(recipe)[0].endswith(f"-o {tmp_path / 'a'} --push-to-hub org/a --hub-private")
    (done,) = run_recipe(recipe)
    assert done.pushed == "pushed org/a" and stub_publish == [(tmp_path / "a", "org/a", {"private": True})]


def test_a_push_without_token_stops_the_job_before_it_starts(tmp_path, monkeypatch, write, cli):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.chdir(tmp_path)
    for name in ("b", "c"):  # a dry run checks that the inputs exist
        (tmp_path / name).mkdir()
    path = write("extract: {base: b, checkpoints: [c], output: adapter}\npush: {repo_id: org/name}\n")
    code, _, err = cli("run", path)
    assert_one_line_error(code, err, 4, "org/name: no Hugging Face token")
    assert not (tmp_path / "adapter").exists()
    code, out, err = cli("run", path, "--dry-run")  # a dry run of the recipe needs no token
    assert code == 0 and "driftmerge push adapter org/name" in out, err


def test_stage_order_and_defaults_in_the_plan(write):
    text = "extract: {base: b, checkpoints: [c], output: a}\napply: {step: 450, output: m, push_to_hub: org/m}\n"
    recipe = load_recipe(write(text + "push: {repo_id: org/p, dry_run: true}\n"))
    assert plan(recipe) == [
        "driftmerge extract b c -o a",
        "driftmerge apply a --step 450 -o m --push-to-hub org/m",
        "driftmerge push m org/p --dry-run",
    ]
