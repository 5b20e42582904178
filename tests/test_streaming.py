"""Read-ahead, shard maps released while streaming, the memory budget on the command line, lazy imports."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import run_cli

from driftmerge.io.checkpoints import Checkpoint
from driftmerge.io.memory import keep_freed_buffers
from driftmerge.io.prefetch import Prefetcher


def test_prefetch_keeps_order_and_stays_within_bytes():
    ahead: list[int] = []
    loaded: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            loaded.append(i)
        return i * i

    with Prefetcher(list(range(20)), load, size_of=lambda i: 10, max_bytes=30) as pf:
        for i, (item, result) in enumerate(pf):
            time.sleep(0.005)  # a slow consumer: the reader runs as far ahead as the budget lets it
            with lock:
                ahead.append(len(loaded) - i)
            assert (item, result) == (i, i * i)
    assert max(ahead) == 4  # the item in hand plus 30 bytes (three 10-byte items) waiting, never more


def test_prefetch_hands_errors_to_the_consumer_and_stops_early():
    def load(i: int) -> int:
        if i == 3:
            raise ValueError("bad shard")
        return i

    got = []
    with pytest.raises(ValueError, match="bad shard"), Prefetcher(list(range(10)), load, lambda i: 1, 100) as pf:
        for item, _ in pf:
            got.append(item)
    assert got == [0, 1, 2]
    with Prefetcher(list(range(1000)), lambda i: i, lambda i: 1, 5) as pf:  # leaving early joins the thread
        next(iter(pf))
    assert not any(t.name == "driftmerge-prefetch" for t in threading.enumerate())


def test_an_item_larger_than_the_budget_still_loads():
    with Prefetcher([1, 2], lambda i: i, lambda i: 1 << 40, 1) as pf:
        assert [r for _, r in pf] == [1, 2]


def test_checkpoint_reads_the_same_when_maps_are_released(runs):
    run = runs["llama"]
    whole = Checkpoint(run.base)
    want = {n: whole.get(n).clone() for n in whole.infos}
    ck = Checkpoint(run.base)
    ck.release_after = 1  # close the shard after every read
    for name, tensor in want.items():
        assert torch.equal(ck.get(name), tensor)
        assert not ck._handles  # nothing stays mapped


def test_max_memory_on_the_command_line(runs, tmp_path, monkeypatch, capsys):
    run = runs["llama"]
    args = ["extract", run.base, *run.checkpoints, "-o", tmp_path / "a"]
    code, _, err = run_cli([*args, "--max-memory", "lots"], monkeypatch, capsys)
    assert code == 2 and "not a size like 5GB" in err and "Traceback" not in err
    code, _, err = run_cli([*args, "--max-memory", "1MB"], monkeypatch, capsys)
    assert code == 3 and "--max-memory must be at least 64 MiB" in err
    assert not (tmp_path / "a").exists()
    code, out, _ = run_cli([*args, "--max-memory", "100MiB"], monkeypatch, capsys)
    assert code == 0 and "wrote" in out


def test_help_and_extract_on_a_known_decoder_do_not_import_transformers(runs, tmp_path):
    run = runs["llama"]
    probe = (
        "import sys\n"
        "from driftmerge_cli.main import cli\n"
        "cli.main(sys.argv[1:], standalone_mode=False)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    help_run = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, check=True)
    assert help_run.stdout.strip().endswith("False False")  # --help loads neither torch nor transformers
    args = ["extract", str(run.base), *map(str, run.checkpoints), "-o", str(tmp_path / "a")]
    ext = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
    assert ext.stdout.strip().endswith("True False")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_setting_is_accepted_by_glibc():
    assert keep_freed_buffers() >= 32 << 20
