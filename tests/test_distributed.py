"""extract and apply under torchrun (gloo, 2 processes on the CPU): the same bytes as one process, and a failing
rank fails the run with one clear line and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import leftovers
from safetensors.torch import load_file, save_file
from synthetic import make_run

from driftmerge.commands.distributed import Dist
from driftmerge.io.model_writer import plan_shards


def _env() -> dict[str, str]:
    # torchrun gives each rank one thread; the single-process reference gets the same, since CPU BLAS results can
    # differ in the last bits between thread counts (not between ranks)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def single(args: list, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "driftmerge", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)


def torchrun(args: list, cwd: Path, n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "driftmerge",
           *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("dist") / "run", noise=0.05, hidden=64, layers=3)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_share_balances_bytes_and_covers_every_name():
    sizes = {f"t{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 30, 5, 5])}
    shares = [Dist(rank=r, world=3).share(list(sizes), sizes) for r in range(3)]
    assert sorted(n for s in shares for n in s) == sorted(sizes)  # each name exactly once
    loads = [sum(sizes[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= 40, loads
    assert all(s == sorted(s, key=list(sizes).index) for s in shares)  # input order kept


def test_plan_shards_follows_the_limit():
    def shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
        return list(plan_shards(names, sizes, limit=limit).filename_to_tensors.values())

    sizes = {"a": 40, "b": 40, "c": 30, "d": 200, "e": 10}
    assert shards(list(sizes), sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert shards(list(sizes), sizes, 10**9) == [list(sizes)]
    assert shards([], {}, 10) == [[]]


def test_plan_shards_names_files_and_index_like_transformers():
    sizes = {"a": 40, "b": 40, "c": 30, "d": 200, "e": 10}
    plan = plan_shards(list(sizes), sizes, limit=100)
    files = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert list(plan.filename_to_tensors) == files
    assert plan.tensor_to_filename == {"a": files[0], "b": files[0], "c": files[1], "d": files[2], "e": files[3]}
    assert plan.metadata == {"total_size": 320} and plan.is_sharded
    one = plan_shards(list(sizes), sizes, limit=10**9)
    assert list(one.filename_to_tensors) == ["model.safetensors"] and not one.is_sharded


@pytest.mark.slow
def test_extract_and_apply_on_two_ranks_write_the_same_bytes(run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ["extract", run.base, *run.checkpoints, "-o", "adapter"]
    done = single(args, one)
    assert done.returncode == 0, done.stderr
    done = torchrun(args, two)
    assert done.returncode == 0, done.stderr
    assert _files(one / "adapter") == _files(two / "adapter")
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout  # per-rank tensors, bytes and time
    assert done.stdout.count("wrote ") == 1  # one report, from rank 0

    args = ["apply", "adapter", "--scale", "1.5", "-o", "model", "--max-shard-size", "100KB"]
    assert single(args, one).returncode == 0
    done = torchrun(args, two)
    assert done.returncode == 0, done.stderr
    written = _files(two / "model")
    assert written == _files(one / "model")
    assert sum(name.endswith(".safetensors") for name in written) > 2  # shards split between the ranks


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_leaves_nothing(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    ck = bad / "checkpoint-200"
    ck.mkdir()
    for f in run.checkpoints[1].iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(ck / "model.safetensors"))
    sizes = {n: t.numel() for n, t in tensors.items() if t.is_floating_point()}
    victim = Dist(rank=1, world=2).share(list(sizes), sizes)[0]  # a tensor rank 1 reads
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[0] = torch.nan
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})

    done = torchrun(["extract", run.base, run.checkpoints[0], ck, run.checkpoints[2], "-o", "adapter"], tmp_path)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("driftmerge: error:")]
    assert len(ours) == 1, done.stderr  # rank 0 speaks for the run
    assert "rank 1 of 2" in ours[0] and victim in ours[0] and "NaN" in ours[0]
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_moe_extract_on_two_ranks_keeps_each_experts_pieces_together(tmp_path):
    """Mixtral's per-expert ``w1``/``w3`` keys are rows of one expert matrix: whichever rank reads them must get
    both, or the fused matrix would be factorized with zero rows. Same bytes as one process."""
    from zoo import make_zoo_run

    zoo_run = make_zoo_run(tmp_path / "run", "mixtral", dtype=torch.float32)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ["extract", zoo_run.base, *zoo_run.checkpoints, "-o", "adapter", "--rank", "2"]
    done = single(args, one)
    assert done.returncode == 0, done.stderr
    done = torchrun(args, two)
    assert done.returncode == 0, done.stderr
    assert _files(one / "adapter") == _files(two / "adapter")
