"""Run-folder discovery: TRL, verl and plain layouts, selection, and clear errors."""

from __future__ import annotations

import shutil

import pytest
from helpers import assert_one_line_error

from driftmerge.errors import InputError
from driftmerge.io.rundirs import discover, select


def trl_tree(runs, root):
    """checkpoint-100/200/300 plus an optimizer-only save and a stray file, as a TRL output folder holds."""
    run = runs["llama"]
    for ck in run.checkpoints:
        shutil.copytree(ck, root / ck.name)
    (root / "checkpoint-400").mkdir()  # a save without weights (interrupted): skipped
    (root / "checkpoint-400" / "optimizer.pt").write_bytes(b"x")
    (root / "trainer_state.json").write_text("{}")
    return root


def test_trl_tree_is_found_in_step_order(runs, tmp_path):
    found = discover(trl_tree(runs, tmp_path / "run"))
    assert [f.step for f in found] == [100, 200, 300]
    assert [f.path.name for f in found] == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]


def test_verl_tree_and_its_unconverted_actor(runs, tmp_path):
    run = runs["llama"]
    root = tmp_path / "verl"
    for ck, step in zip(run.checkpoints, (10, 20, 30), strict=True):
        shutil.copytree(ck, root / f"global_step_{step}" / "actor" / "huggingface")
    found = discover(root)
    assert [f.step for f in found] == [10, 20, 30] and all(f.path.name == "huggingface" for f in found)
    (root / "global_step_40" / "actor").mkdir(parents=True)
    (root / "global_step_40" / "actor" / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"verl actor checkpoint that is not in Hugging Face format.*model_merger"):
        discover(root)


def test_selection_every_range_last():
    from driftmerge.io.rundirs import Found

    found = [Found(s, None) for s in (50, 100, 150, 200, 250, 300)]  # type: ignore[arg-type]
    assert [f.step for f in select(found, every=100)] == [100, 200, 300]
    assert [f.step for f in select(found, steps_range="100:250")] == [100, 150, 200, 250]
    assert [f.step for f in select(found, steps_range=":100")] == [50, 100]
    assert [f.step for f in select(found, last=2)] == [250, 300]
    assert [f.step for f in select(found, every=50, steps_range="150:", last=2)] == [250, 300]
    for bad, match in (({"every": 0}, "--every"), ({"last": 0}, "--last"), ({"steps_range": "3-5"}, "A:B")):
        with pytest.raises(InputError, match=match):
            select(found, **bad)
    with pytest.raises(InputError, match=r"no checkpoint left.*50, 100"):
        select(found, steps_range="400:")


def test_extract_from_a_run_dir_equals_listing_the_checkpoints(runs, tmp_path, cli):
    run = runs["llama"]
    root = trl_tree(runs, tmp_path / "run")
    code, _, err = cli("extract", run.base, "--run-dir", root, "--last", "2", "-o", tmp_path / "a")
    assert code == 0, err
    assert "took 2 of 3 checkpoints, steps 200, 300" in err
    assert cli("extract", run.base, *run.checkpoints[1:], "-o", tmp_path / "b")[0] == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()


def test_run_dir_usage_errors(runs, tmp_path, cli):
    run = runs["llama"]
    code, _, err = cli("extract", run.base, run.checkpoints[0], "--run-dir", tmp_path, "-o", tmp_path / "a")
    assert code == 2 and "not both" in err
    code, _, err = cli("extract", run.base, run.checkpoints[0], "--last", "1", "-o", tmp_path / "a")
    assert code == 2 and "--run-dir" in err
    code, _, err = cli("extract", run.base, "-o", tmp_path / "a")
    assert code == 2 and "CHECKPOINT" in err
    code, _, err = cli("extract", run.base, "--run-dir", tmp_path / "nope", "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "nope", "no such run folder")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("extract", run.base, "--run-dir", tmp_path / "empty", "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "no checkpoint folders")
    assert not (tmp_path / "a").exists()
