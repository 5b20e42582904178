"""The reliability contract (docs/design.md §6): a corpus of bad inputs, killed writes, a full disk, untouched inputs
and byte-for-byte determinism."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, leftovers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from synthetic import SyntheticRun, make_run

from driftmerge.errors import InputError
from driftmerge.io.checkpoints import Checkpoint


def snapshot(*folders: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, size and modification time (ns) of every file under ``folders``."""
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file() or f.is_symlink():
                st_ = f.lstat()
                data = f.read_bytes() if f.is_file() else b""
                out[str(f)] = (hashlib.sha256(data).hexdigest(), st_.st_size, st_.st_mtime_ns)
    return out


def copy_of(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of a model folder; ``edit`` may change its tensors in place before they are saved."""
    shutil.copytree(src, dst)
    if edit:
        w = load_file(str(dst / "model.safetensors"))
        edit(w)
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def rewrite(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(change(path.read_bytes()))


# ---- the corpus: (builder of the command's arguments, exit code, fragments of the one-line message) -------------
# Each builder gets the session's llama run, a scratch folder, and the output path, and returns CLI arguments.
Case = tuple[Callable[[SyntheticRun, Path, Path], list], int, tuple[str, ...]]


def _ex(run: SyntheticRun, *cks: Path | str, out: Path, extra: tuple = ()) -> list:
    return ["extract", run.base, *cks, "-o", out, *extra]


def _truncated(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    rewrite(bad / "model.safetensors", lambda b: b[: len(b) // 2])
    return _ex(run, bad, out=out)


def _zero_length(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    rewrite(bad / "model.safetensors", lambda b: b"")
    return _ex(run, bad, out=out)


def _corrupt_header(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    rewrite(bad / "model.safetensors", lambda b: b[:12] + b"\x00garbage{" + b[21:])
    return _ex(run, bad, out=out)


def _truncated_tensor_data(run, tmp, out):  # the header is whole, the last bytes are gone
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    rewrite(bad / "model.safetensors", lambda b: b[:-64])
    return _ex(run, bad, out=out)


def _index_missing_shard(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    names = list(Checkpoint(bad).infos)
    files = {n: ("model-00002-of-00002.safetensors" if i % 2 else "model.safetensors") for i, n in enumerate(names)}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    return _ex(run, bad, out=out)


def _index_not_json(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    (bad / "model.safetensors.index.json").write_text("{weight_map: ")
    return _ex(run, bad, out=out)


def _config_not_json(run, tmp, out):
    bad = copy_of(run.checkpoints[0], tmp / "checkpoint-100")
    (bad / "config.json").write_text("[1, 2")
    return _ex(run, bad, out=out)


def _file_not_folder(run, tmp, out):
    return _ex(run, run.checkpoints[0] / "model.safetensors", out=out)


def _dangling_weights(run, tmp, out):  # the weight file is a link to nowhere: unreadable
    bad = tmp / "checkpoint-100"
    bad.mkdir()
    (bad / "config.json").write_bytes((run.checkpoints[0] / "config.json").read_bytes())
    (bad / "model.safetensors").symlink_to(tmp / "gone.safetensors")
    return _ex(run, bad, out=out)


def _missing_tensor(run, tmp, out):
    bad = copy_of(run.checkpoints[1], tmp / "checkpoint-200", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    return _ex(run, run.checkpoints[0], bad, out=out)


def _reshaped_tensor(run, tmp, out):
    def edit(w):
        w["model.layers.0.self_attn.o_proj.weight"] = w["model.layers.0.self_attn.o_proj.weight"][:, :16].clone()

    return _ex(run, copy_of(run.checkpoints[0], tmp / "checkpoint-100", edit), out=out)


def _other_vocab(run, tmp, out):
    def edit(w):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in w:
                w[name] = torch.cat([w[name], w[name][:8]])  # 8 added tokens

    return _ex(run, copy_of(run.checkpoints[0], tmp / "checkpoint-100", edit), out=out)


def _nan(run, tmp, out):
    def edit(w):
        w["model.layers.1.mlp.down_proj.weight"][2, 3] = float("nan")

    return _ex(run, copy_of(run.checkpoints[2], tmp / "checkpoint-300", edit), out=out)


def _inf_in_base(run, tmp, out):
    def edit(w):
        w["model.norm.weight"][0] = float("-inf")

    base = copy_of(run.base, tmp / "base", edit)
    return ["extract", base, *run.checkpoints, "-o", out]


def _duplicate_steps(run, tmp, out):
    a = copy_of(run.checkpoints[0], tmp / "a" / "checkpoint-100")
    b = copy_of(run.checkpoints[1], tmp / "b" / "checkpoint-100")
    return _ex(run, a, b, out=out)


def _identical(run, tmp, out):
    return _ex(run, copy_of(run.base, tmp / "checkpoint-100"), out=out)


def _adapter(run: SyntheticRun, tmp: Path) -> Path:
    """A good adapter, made once per test that needs one."""
    from driftmerge.commands.extract import ExtractOptions, extract

    return extract(run.base, run.checkpoints, out_dir=tmp / "adapter", options=ExtractOptions()).out_dir


def _adapter_meta_not_json(run, tmp, out):
    ad = _adapter(run, tmp)
    (ad / "driftmerge.json").write_text("{not json")
    return ["apply", ad, "--scale", "1", "-o", out]


def _adapter_weights_truncated(run, tmp, out):
    ad = _adapter(run, tmp)
    rewrite(ad / "adapter_model.safetensors", lambda b: b[: len(b) // 3])
    return ["apply", ad, "--scale", "1", "-o", out]


def _adapter_other_base(run, tmp, out):
    other = make_run(tmp / "wide", arch="llama", hidden=48, steps=(100,))
    return ["apply", _adapter(run, tmp), "--scale", "1", "--base", other.base, "-o", out]


CORPUS: dict[str, Case] = {
    "missing path": (lambda r, t, o: _ex(r, t / "nope", out=o), 3, ("nope", "no such")),
    "a file, not a folder": (_file_not_folder, 3, ("not a folder",)),
    "folder without weights": (lambda r, t, o: _ex(r, (t / "empty").mkdir() or t / "empty", out=o), 3, ("no model",)),
    "weight file unreadable (dangling link)": (_dangling_weights, 3, ("no model weights",)),
    "truncated safetensors": (_truncated, 3, ("model.safetensors", "cannot read", "copy or save it again")),
    "zero-length safetensors": (_zero_length, 3, ("model.safetensors", "cannot read")),
    "corrupt header": (_corrupt_header, 3, ("model.safetensors", "cannot read")),
    "truncated tensor data": (_truncated_tensor_data, 3, ("model.safetensors", "cannot read")),
    "index names a missing shard": (_index_missing_shard, 3, ("model-00002-of-00002.safetensors", "missing")),
    "index not JSON": (_index_not_json, 3, ("model.safetensors.index.json", "not valid JSON")),
    "config not JSON": (_config_not_json, 3, ("config.json", "not valid JSON")),
    "other architecture": (
        lambda r, t, o: _ex(r, make_run(t, arch="qwen2", steps=(1,)).checkpoints[0], out=o),
        3,
        ("architecture",),
    ),
    "tensor missing in one checkpoint": (_missing_tensor, 3, ("checkpoint-200", "model.layers.1.mlp.up_proj.weight")),
    "tensor reshaped": (_reshaped_tensor, 3, ("model.layers.0.self_attn.o_proj.weight", "shape")),
    "other vocabulary size": (_other_vocab, 3, ("72 rows against 64", "vocabular")),
    "NaN in a checkpoint": (_nan, 3, ("checkpoint-300", "model.layers.1.mlp.down_proj.weight", "NaN or Inf")),
    "Inf in the base": (_inf_in_base, 3, ("base", "model.norm.weight", "NaN or Inf")),
    "duplicate steps": (_duplicate_steps, 3, ("step 100", "--steps")),
    "non-increasing --steps": (
        lambda r, t, o: _ex(r, *r.checkpoints, out=o, extra=("--steps", "300,200,100")),
        3,
        ("increase",),
    ),
    "checkpoint identical to the base": (_identical, 3, ("identical to the base",)),
    "rank 0": (lambda r, t, o: _ex(r, *r.checkpoints, out=o, extra=("--rank", "0")), 3, ("--rank", "at least 1")),
    "negative rank": (lambda r, t, o: _ex(r, *r.checkpoints, out=o, extra=("--rank", "-3")), 3, ("--rank", "-3")),
    "rank too large": (
        lambda r, t, o: _ex(r, *r.checkpoints, out=o, extra=("--rank", "4096")),
        3,
        ("--rank 4096", "at most"),
    ),
    "scale not a number": (lambda r, t, o: ["apply", _adapter(r, t), "--scale", "x1.5", "-o", o], 2, ("x1.5",)),
    "scale NaN": (lambda r, t, o: ["apply", _adapter(r, t), "--scale", "nan", "-o", o], 3, ("finite",)),
    "scale infinite": (lambda r, t, o: ["apply", _adapter(r, t), "--scale", "inf", "-o", o], 3, ("finite",)),
    "output inside an input": (
        lambda r, t, o: _ex(r, *r.checkpoints, out=r.checkpoints[0] / "adapter"),
        4,
        ("inside the input",),
    ),
    "output replaces an input": (lambda r, t, o: _ex(r, *r.checkpoints, out=r.checkpoints[0]), 4, ("would replace",)),
    "adapter metadata not JSON": (_adapter_meta_not_json, 3, ("cannot read the adapter", "extract again")),
    "adapter weights truncated": (_adapter_weights_truncated, 3, ("cannot read the adapter",)),
    "adapter from another base": (_adapter_other_base, 3, ("another base",)),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_gives_one_line_and_leaves_nothing(case, runs, tmp_path, cli):
    run = runs["llama"]
    build, want_code, fragments = CORPUS[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    args = build(run, work, out)
    before = snapshot(run.base, *run.checkpoints, work)
    code, stdout, err = cli(*args)
    if want_code == 2:  # click's usage errors: "Error: Invalid value ...", no traceback
        assert code == 2 and "Traceback" not in err and all(f in err for f in fragments), err
    else:
        assert_one_line_error(code, err, want_code, *fragments)
    assert stdout == ""
    assert not out.exists() and not leftovers(tmp_path)
    assert not (run.checkpoints[0] / "adapter").exists()
    assert snapshot(run.base, *run.checkpoints, work) == before  # inputs untouched, bytes and times


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights(runs, tmp_path, cli):
    bad = copy_of(runs["llama"].checkpoints[0], tmp_path / "checkpoint-100")
    (bad / "model.safetensors").chmod(0)
    code, _, err = cli("extract", runs["llama"].base, bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "model.safetensors", "cannot read")
    assert not (tmp_path / "out").exists()


# ---- fuzzed headers: anything in the first bytes of a safetensors file gives InputError or a valid model -------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)
_tensor_like = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F8_E4M3", "XX", ""]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3),
    }
)
_header = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), _tensor_like, max_size=3).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)), body=st.binary(max_size=64))
def test_fuzzed_safetensors_headers_never_crash(tmp_path_factory, header, declared, body):
    folder = tmp_path_factory.mktemp("fuzz")
    size = len(header) if declared is None else declared
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + header + body)
    try:
        ck = Checkpoint(folder)
    except InputError as exc:
        assert str(exc).startswith(str(folder)) and "\n" not in str(exc)
        return
    for name in ck.infos:  # a header that parses must also read, or fail as InputError
        with contextlib.suppress(InputError):
            ck.get(name)


def test_fuzzed_header_through_the_command_line(runs, tmp_path, cli):
    bad = copy_of(runs["llama"].checkpoints[0], tmp_path / "checkpoint-100")
    rewrite(
        bad / "model.safetensors", lambda b: struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [1e9]}}' + b[8:]
    )
    code, _, err = cli("extract", runs["llama"].base, bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, "model.safetensors")
    assert not (tmp_path / "out").exists()


# ---- killed mid-write: the target is absent or still the previous complete one --------------------------------
_KILLABLE = """
import pathlib, sys, time
import {module} as target_module
from driftmerge_cli.main import main

real = target_module.save_file
ready = pathlib.Path(sys.argv[1])

def save_then_hang(*args, **kwargs):
    real(*args, **kwargs)  # one file fully written into the temporary folder
    ready.write_text("writing")
    time.sleep(600)

target_module.save_file = save_then_hang
sys.argv = ["driftmerge", *sys.argv[2:]]
main()
"""


def _kill_mid_write(module: str, args: list, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    code = _KILLABLE.format(module=module)
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready), *map(str, args)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, module",
    [("extract", "driftmerge.io.adapter"), ("apply", "driftmerge.io.model_writer")],
)
def test_sigkill_mid_write_leaves_no_output_or_the_previous_one(command, module, runs, tmp_path, cli):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    out = tmp_path / "out"
    args = (
        ["extract", run.base, *run.checkpoints, "-o", out, "--rank", "2"]
        if command == "extract"
        else ["apply", adapter, "--scale", "1.5", "-o", out, "--max-shard-size", "20KB"]
    )
    inputs = snapshot(run.base, *run.checkpoints, adapter)

    _kill_mid_write(module, args, tmp_path)  # no previous output: none after the kill
    assert not out.exists()
    assert leftovers(tmp_path)  # a killed process cannot clean up after itself ...

    assert cli(*args)[0] == 0  # ... the next run on the same target does, and completes
    assert not leftovers(tmp_path)
    previous = snapshot(out)

    _kill_mid_write(module, [*args, "--overwrite"], tmp_path)  # a previous output: untouched by the kill
    assert snapshot(out) == previous
    assert cli(*args, "--overwrite")[0] == 0
    assert not leftovers(tmp_path)
    assert snapshot(run.base, *run.checkpoints, adapter) == inputs


# ---- a full disk: a clear error, no partial output ---------------------------------------------------------------
@pytest.mark.parametrize(
    "command, module", [("extract", "driftmerge.io.adapter"), ("apply", "driftmerge.io.model_writer")]
)
def test_full_disk_gives_a_clear_error_and_no_output(command, module, runs, tmp_path, cli, monkeypatch):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    calls = []

    def fill_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:  # the first file goes through, the next finds the disk full halfway
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(f"{module}.save_file", fill_the_disk)
    out = tmp_path / "out"
    args = (
        ["extract", run.base, *run.checkpoints, "-o", out]
        if command == "extract"
        else ["apply", adapter, "--scale", "1.5", "-o", out, "--max-shard-size", "20KB"]
    )
    code, _, err = cli(*args)
    assert_one_line_error(code, err, 4, str(out), "disk is full", "nothing was left behind")
    assert len(calls) == 2
    assert not out.exists() and not leftovers(tmp_path)


# ---- inputs are only read ---------------------------------------------------------------------------------------
def test_every_command_leaves_its_inputs_as_they_were(runs, tmp_path, cli):
    run = runs["llama"]
    legacy = []
    for src in [run.base, *run.checkpoints]:  # the .bin path memory-maps too: check it writes nothing either
        dst = tmp_path / "legacy" / src.name
        dst.mkdir(parents=True)
        torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
        shutil.copy(src / "config.json", dst / "config.json")
        legacy.append(dst)
    before = snapshot(run.base, *run.checkpoints, *legacy)
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "a", "--fit", "pca")[0] == 0
    assert cli("extract", legacy[0], *legacy[1:], "-o", tmp_path / "b", "--device", "cpu")[0] == 0
    ad_before = snapshot(tmp_path / "a")
    assert cli("apply", tmp_path / "a", "--scale", "1.5", "-o", tmp_path / "m")[0] == 0
    assert cli("apply", tmp_path / "a", "--step", "450", "--format", "adapter", "-o", tmp_path / "s")[0] == 0
    assert cli("apply", tmp_path / "b", "--scale", "2", "--base", legacy[0], "-o", tmp_path / "m2")[0] == 0
    assert snapshot(run.base, *run.checkpoints, *legacy) == before
    assert snapshot(tmp_path / "a") == ad_before


# ---- determinism: same inputs and seed, same bytes, whatever the budget -------------------------------------------
def test_same_command_twice_gives_identical_folders(runs, tmp_path, cli):
    run = runs["llama"]
    folders = {}
    for i in range(2):
        ad, model = tmp_path / "adapter", tmp_path / "model"
        assert cli("extract", run.base, *run.checkpoints, "-o", ad, "--rank", "0.9", "--seed", "3")[0] == 0
        assert cli("apply", ad, "--scale", "1.5", "-o", model, "--max-shard-size", "30KB")[0] == 0
        folders[i] = {p.relative_to(tmp_path): p.read_bytes() for d in (ad, model) for p in d.rglob("*") if p.is_file()}
        shutil.move(ad, tmp_path / f"adapter-{i}")  # the same paths each time, so even the cards' commands match
        shutil.move(model, tmp_path / f"model-{i}")
    assert folders[0] == folders[1]
    assert any(p.name == "README.md" for p in folders[0]) and any(p.suffix == ".safetensors" for p in folders[0])


def test_memory_budget_does_not_change_the_model(runs, tmp_path, cli):
    run = runs["llama"]
    for name, budget in (("big", "8GiB"), ("small", "64MiB")):
        assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / name, "--max-memory", budget)[0] == 0
        assert cli("apply", tmp_path / name, "--scale", "1.25", "-o", tmp_path / f"m-{name}")[0] == 0
    big = {p.name: p.read_bytes() for p in (tmp_path / "m-big").glob("*.safetensors")}
    small = {p.name: p.read_bytes() for p in (tmp_path / "m-small").glob("*.safetensors")}
    assert big and big == small
