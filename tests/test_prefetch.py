"""The read-ahead thread: errors and a dead worker reach the consumer, closing stops it, shared checkpoints are locked.

Every consumer runs under :func:`within`, so a regression fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import driftmerge.io.checkpoints as checkpoints_mod
import driftmerge.io.stream as stream_mod
from driftmerge.io.checkpoints import Checkpoint
from driftmerge.io.prefetch import Prefetcher
from driftmerge.io.stream import stream_deltas

LIMIT_S = 10.0


def within(fn: Callable[[], Any], seconds: float = LIMIT_S) -> dict[str, Any]:
    """Run ``fn`` on a daemon thread; fail if it has not finished after ``seconds``. Returns {"value"} or {"error"}."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # the test inspects it
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the consumer still waits after {seconds} s"
    return box


def consume(pf: Prefetcher, got: list[Any]) -> Callable[[], None]:
    def run() -> None:
        with pf:
            for item, result in pf:
                got.append((item, result))

    return run


# ---- Prefetcher ------------------------------------------------------------------------------------------------
def test_an_error_in_size_of_reaches_the_consumer_at_that_item():
    def size_of(i: int) -> int:
        if i == 2:
            raise ValueError("no header for 2")
        return 1

    got: list[Any] = []
    box = within(consume(Prefetcher(list(range(5)), lambda i: i * 10, size_of, 100), got))
    assert isinstance(box.get("error"), ValueError) and "no header for 2" in str(box["error"])
    assert got == [(0, 0), (1, 10)]


def test_an_error_in_load_reaches_the_consumer_after_the_earlier_items():
    class Die(BaseException):  # not an Exception: still handed over, not lost with the thread
        pass

    def load(i: int) -> int:
        if i == 3:
            raise Die("shard 3 unreadable")
        return -i

    got: list[Any] = []
    box = within(consume(Prefetcher(list(range(6)), load, lambda i: 1, 2), got))
    assert isinstance(box.get("error"), Die)
    assert got == [(0, 0), (1, -1), (2, -2)]


@pytest.mark.parametrize("dies_in", ["_run", "_read_all"])
def test_a_worker_that_dies_is_detected(monkeypatch, dies_in):
    # "_run": the thread ends without its own clean-up (found by is_alive); "_read_all": it ends early, cleanly
    monkeypatch.setattr(Prefetcher, dies_in, lambda self: None)
    got: list[Any] = []
    box = within(consume(Prefetcher(list(range(4)), lambda i: i, lambda i: 1, 10), got))
    assert isinstance(box.get("error"), RuntimeError), box
    assert "read-ahead thread stopped" in str(box["error"])
    assert got == []


def test_leaving_early_stops_the_thread():
    def load(i: int) -> int:
        time.sleep(0.001)
        return i

    pf = Prefetcher(list(range(10_000)), load, lambda i: 1, 8)

    def leave_early() -> None:
        with pf:
            for item, _ in pf:
                if item == 2:
                    break

    assert "error" not in within(leave_early)
    assert not pf._thread.is_alive()
    pf2 = Prefetcher(list(range(10_000)), load, lambda i: 1, 8)
    next(iter(pf2))
    within(pf2.close)
    assert not pf2._thread.is_alive()


# ---- Checkpoint.get from two threads ---------------------------------------------------------------------------
class _Watched:
    """A safetensors handle that records when two threads use it (or its checkpoint's handles) at once."""

    active = 0
    overlaps = 0
    guard = threading.Lock()

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        with _Watched.guard:
            _Watched.active += 1
            _Watched.overlaps += _Watched.active > 1
        try:
            time.sleep(0.0002)  # let the other threads run while this handle is in use
            return self._inner.get_tensor(name)
        finally:
            with _Watched.guard:
                _Watched.active -= 1


def _tiny_model(folder: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(3 + i, 5, generator=gen) for i in range(12)}
    tensors["norm.weight"] = torch.randn(7, generator=gen).to(torch.bfloat16)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def test_checkpoint_get_from_several_threads_at_once(tmp_path, monkeypatch):
    want = _tiny_model(tmp_path / "m")
    real_open = checkpoints_mod.safe_open
    monkeypatch.setattr(checkpoints_mod, "safe_open", lambda *a, **k: _Watched(real_open(*a, **k)))
    monkeypatch.setattr(_Watched, "overlaps", 0)
    ck = Checkpoint(tmp_path / "m")
    ck.release_after = 100  # release the map every few reads
    names = list(want)
    errors: list[BaseException] = []
    wrong: list[str] = []
    start = threading.Barrier(4)

    def hammer(k: int) -> None:
        try:
            start.wait()
            for r in range(30):
                for name in names if (k + r) % 2 else names[::-1]:
                    if not torch.equal(ck.get(name), want[name]):
                        wrong.append(name)
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LIMIT_S * 3)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and wrong == []
    assert _Watched.overlaps == 0  # no handle was read by two threads at once
    assert len(ck._handles) <= 1 and set(ck._read_through) <= set(ck._handles)


# ---- stream_deltas: every tensor it takes is the one it expects ------------------------------------------------
def _tiny_run(tmp_path: Path) -> list[Checkpoint]:
    base = _tiny_model(tmp_path / "base")
    for j in (1, 2):
        (tmp_path / f"c{j}").mkdir()
        save_file({n: t + j for n, t in base.items()}, str(tmp_path / f"c{j}" / "model.safetensors"))
    return [Checkpoint(tmp_path / p) for p in ("base", "c1", "c2")]


def test_stream_deltas_yields_the_deltas(tmp_path):
    sources = _tiny_run(tmp_path)
    names = list(sources[0].infos)[:3]

    def run() -> list[tuple[str, int, float]]:
        out = []
        for name, deltas in stream_deltas(names, sources, device=torch.device("cpu"), read_ahead=1 << 20):
            out += [(name, j, float(d.mean())) for j, d in deltas]
        return out

    box = within(run)
    assert [(n, j) for n, j, _ in box["value"]] == [(n, j) for n in names for j in (1, 2)]
    assert all(abs(m - j) < 1e-6 for _, j, m in box["value"])


def test_stream_deltas_raises_on_a_key_out_of_order(tmp_path, monkeypatch):
    sources = _tiny_run(tmp_path)
    names = list(sources[0].infos)[:2]

    class Swapped(Prefetcher):
        def __iter__(self) -> Iterator[Any]:
            pairs = list(super().__iter__())
            pairs[1], pairs[2] = pairs[2], pairs[1]  # (name0, 2) before (name0, 1)
            return iter(pairs)

    monkeypatch.setattr(stream_mod, "Prefetcher", Swapped)

    def run() -> None:
        for _, deltas in stream_deltas(names, sources, device=torch.device("cpu"), read_ahead=1 << 20):
            list(deltas)

    err = within(run).get("error")
    assert isinstance(err, RuntimeError), err
    assert f"expected {(names[0], 1)!r}" in str(err) and f"got {(names[0], 2)!r}" in str(err)


def test_stream_deltas_raises_when_deltas_are_not_exhausted(tmp_path):
    sources = _tiny_run(tmp_path)
    names = list(sources[0].infos)[:2]

    def run() -> None:
        for _name, _deltas in stream_deltas(names, sources, device=torch.device("cpu"), read_ahead=1 << 20):
            pass  # skips the checkpoints' tensors: the next base read gets one of them

    err = within(run).get("error")
    assert isinstance(err, RuntimeError), err
    assert f"expected {(names[1], 0)!r}" in str(err) and f"got {(names[0], 1)!r}" in str(err)
