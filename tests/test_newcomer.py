"""What a newcomer met (issue 18): every error path ends in one line and its documented exit code.

- Ctrl-C: exit code 130 and one line, from the real entry point (``python -m driftmerge``) interrupted while it
  works, and nothing left behind.
- Read-only and full targets: a real read-only mount and a real full file system, made in a private mount namespace
  (``unshare --mount``; as root, or as a user through a user namespace) so the commands meet the kernel's own
  ``EROFS`` / ``ENOSPC``, the errors the newcomer saw (a ``chmod 0o555`` folder does not stop root, which runs this
  suite). Skipped where no mount namespace can be made.
- ``demo --keep`` twice, ``--overwrite``, and commands printed so that they run from where the user stands.
- A missing ``foo/bar`` folder is named as missing, not only as an unknown Hub repo; ``export-mergekit`` takes a
  Hub adapter and ``apply``'s rules for ``--scale`` / ``--step``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import yaml
from fakehub import FakeHub, fake_hub_fixture  # noqa: F401
from helpers import assert_one_line_error, leftovers

from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
INTERRUPTED = "driftmerge: interrupted; no partial output was left behind"
# What a shell reports as exit status 130: exit(130), or death by SIGINT (128 + 2), which CPython chooses itself, after
# driftmerge has handled the interrupt and printed its line, when the KeyboardInterrupt passed through code a C
# extension ran with PyRun_* (it then counts it as unhandled: _Py_UnhandledKeyboardInterrupt).
SHELL_130 = (130, -signal.SIGINT)


@pytest.fixture(scope="module")
def adapter(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "adapter"
    run = runs["llama"]
    extract(run.base, run.checkpoints, out_dir=out, options=ExtractOptions())
    return out


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- 1. Ctrl-C ---------------------------------------------------------------------------------------------------
def _opened(pid: int, name: str) -> bool:
    """Whether process ``pid`` has ``name`` open or mapped (safetensors maps the weights it reads)."""
    proc = Path(f"/proc/{pid}")
    try:
        fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        maps = (proc / "maps").read_text()
    except OSError:  # not yet, or already gone
        return False
    return name in maps or any(name in f for f in fds)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when the child reads weights")
@pytest.mark.parametrize("command", ["extract", "analyze"])
def test_ctrl_c_while_working_exits_130_with_one_line(command, runs, tmp_path):
    """SIGINT once the child reads the weights (inside the command, where click used to turn it into Abort and
    exit code 1)."""
    run = runs["llama"]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "driftmerge", command, run.base, *run.checkpoints, "-o", out]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    weights = str(run.base / "model.safetensors")
    _interrupt_when(proc, lambda: _opened(proc.pid, weights), "read the weights", poll=0.002)
    assert not out.exists() and not leftovers(tmp_path)


def _interrupt_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    *,
    poll: float,
    check: Callable[[], None] | None = None,
) -> None:
    """SIGINT to ``proc`` once ``ready()`` (after ``check()``, which may assert on that moment); it must end with
    exit code 130 and the one interrupted line."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the child never {what}"
        time.sleep(poll)
    if check is not None:
        check()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in SHELL_130, err
    assert _one_line(err) == INTERRUPTED


_HANGS_MID_WRITE = """
import pathlib, sys, time
import driftmerge.io.model_writer as writer
from driftmerge_cli.main import main

real, ready = writer.save_file, pathlib.Path(sys.argv[1])

def save_then_wait(*args, **kwargs):
    real(*args, **kwargs)  # one shard written into the temporary folder
    ready.write_text("writing")
    time.sleep(600)  # the long work SIGINT interrupts

writer.save_file = save_then_wait
sys.argv = ["driftmerge", *sys.argv[2:]]
main()
"""


def test_ctrl_c_mid_write_removes_the_temporary_folder(adapter, tmp_path):
    """SIGINT while ``apply`` writes its shards: the temporary sibling goes, exit code 130, one line."""
    ready, out = tmp_path / "ready", tmp_path / "out"
    args = ["apply", adapter, "--scale", "1.5", "-o", out, "--max-shard-size", "20KB"]
    code = [sys.executable, "-c", _HANGS_MID_WRITE, ready, *args]
    proc = subprocess.Popen(list(map(str, code)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def shard_in_temporary_sibling() -> None:
        assert leftovers(tmp_path)

    _interrupt_when(proc, ready.exists, "reached the write", poll=0.02, check=shard_in_temporary_sibling)
    assert not out.exists() and not leftovers(tmp_path)


_UNCLOSED_READ_AHEAD = """
import time, torch
from driftmerge.io.prefetch import Prefetcher

def load(i):
    a = torch.randn(800, 800)
    for _ in range(10):
        a = a @ a / 30.0  # torch code, the GIL released
    return i

reader = Prefetcher(list(range(100)), load, lambda i: 1, 1 << 30)  # never closed: Ctrl-C before its `with`
time.sleep(0.3)
raise SystemExit(130)
"""


def test_exit_with_a_read_ahead_still_running_is_clean():
    """A read-ahead thread still inside torch code as Python exits (Ctrl-C between starting it and entering its
    ``with``, or a stream generator left suspended) used to abort the process (SIGABRT, "terminate called without
    an active exception") instead of exiting 130: it is closed at exit."""
    r = subprocess.run([sys.executable, "-c", _UNCLOSED_READ_AHEAD], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (130, "")


def test_help_lists_exit_code_130(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "130 interrupted" in " ".join(out.split())
    tables = [ROOT / "README.md", ROOT / "docs" / "reference.md"]  # wherever the exit-code table lives
    assert any("| 130 | interrupted" in f.read_text() for f in tables if f.is_file())


# ---- 2. read-only and full targets -------------------------------------------------------------------------------
def _unshare() -> list[str]:
    """``unshare --mount`` (with a user namespace when not root), or skip where none can be made."""
    cmd = ["unshare", "--mount", *([] if os.geteuid() == 0 else ["--map-root-user"])]
    if shutil.which("unshare") is None or subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare --mount)")
    return cmd


def _in_mount(setup: str, args: list, *, after: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``python -m driftmerge ARGS`` in a private mount namespace after ``setup`` (shell); ``after`` runs in the
    namespace too (what a tmpfs holds is gone once the namespace ends)."""
    script = f'{setup} || exit 99; "$0" -m driftmerge "$@"; rc=$?; {after or ":"}; exit $rc'
    cmd = [*_unshare(), "sh", "-c", script, sys.executable, *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 99, result.stderr  # the mount itself failed
    return result


def _read_only(folder: Path) -> str:
    """Shell that makes ``folder`` a read-only bind mount of itself."""
    d = shlex.quote(str(folder))
    return f"mount --bind {d} {d} && mount -o remount,bind,ro {d} && ! touch {d}/.probe 2>/dev/null"


def _full(folder: Path) -> str:
    """Shell that mounts a 64 KiB tmpfs on ``folder`` and fills it."""
    d = shlex.quote(str(folder))
    return f"mount -t tmpfs -o size=64k tmpfs {d} && {{ head -c 1048576 /dev/zero > {d}/filler 2>/dev/null; true; }}"


def test_export_mergekit_into_a_read_only_folder(adapter, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = _in_mount(_read_only(ro), ["export-mergekit", adapter, "--scale", "1.5", "-o", ro / "mk.yaml"])
    assert_one_line_error(r.returncode, r.stderr, 4, str(ro / "mk.yaml"), "cannot write the config", "Read-only")
    assert list(ro.iterdir()) == []


def test_export_mergekit_onto_a_full_disk(adapter, tmp_path):
    full, listing = tmp_path / "full", tmp_path / "listing"
    full.mkdir()
    r = _in_mount(
        _full(full),
        ["export-mergekit", adapter, "--scale", "1.5", "-o", full / "mk.yaml"],
        after=f"ls -A {full} > {listing}",
    )
    assert_one_line_error(r.returncode, r.stderr, 4, "the disk is full", "nothing was left behind")
    assert listing.read_text().split() == ["filler"]  # no config, no temporary file


@pytest.mark.parametrize("target", ["read-only", "full"])
def test_generate_into_a_read_only_or_full_folder(target, tmp_path):
    """On the shipped toy run (it has a tokenizer, so generation runs): a read-only folder fails before any model
    loads, a full one when the completions are written; one line, exit code 4, no file either way."""
    from driftmerge.commands.demo import DATA

    run = Path(str(resources.files("driftmerge") / "data" / DATA))
    folder, listing = tmp_path / "out", tmp_path / "listing"
    folder.mkdir()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+3="}) + "\n")
    args = ["generate", "--early", run / "base", "--late", run / "checkpoint-600", "--prompts", prompts]
    setup = _read_only(folder) if target == "read-only" else _full(folder)
    r = _in_mount(
        setup, [*args, "--max-new-tokens", "2", "-o", folder / "gen.jsonl"], after=f"ls -A {folder} > {listing}"
    )
    why = "Read-only" if target == "read-only" else "the disk is full"
    assert_one_line_error(r.returncode, r.stderr, 4, str(folder / "gen.jsonl"), "cannot write the completions", why)
    assert listing.read_text().split() == ([] if target == "read-only" else ["filler"])


def test_demo_keep_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = _in_mount(_read_only(ro), ["demo", "--keep", ro / "demo"])
    assert_one_line_error(r.returncode, r.stderr, 4, str(ro / "demo"), "Read-only")
    assert r.stdout == "" and list(ro.iterdir()) == []


def test_unwritable_folder_in_process(adapter, tmp_path, cli):
    """The same refusal for a folder without write permission, where the user is not root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) writes into a 0o555 folder")
        code, _, err = cli("export-mergekit", adapter, "--scale", "1", "-o", locked / "mk.yaml")
        assert_one_line_error(code, err, 4, str(locked / "mk.yaml"), "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ---- 2 and 3. demo --keep twice, --overwrite, and commands that run where the user stands -------------------------
def test_demo_keep_refuses_then_overwrites_and_prints_runnable_commands(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = Path("runs") / "demo"
    code, out, err = cli("demo", "--keep", kept)
    assert code == 0, err
    commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("$ driftmerge ")]
    assert [c[1] for c in commands] == ["extract", "apply"]
    for argv in commands:  # every path is one the user can type from here
        paths = [a for a in argv[2:] if "/" in a]
        assert paths and all(Path(p).exists() for p in paths), argv
        assert all(not Path(p).is_absolute() for p in paths), argv  # relative here is shorter
        code, _, err = cli(*argv[1:], "--overwrite")
        assert code == 0, (argv, err)
    assert f"wrote {kept / 'driftmerge-adapter'}\n" in out
    another = shlex.split(out.split("Another scale, on the kept files:\n")[1].splitlines()[0])
    code, _, err = cli(*another[1:])  # as printed, nothing added
    assert code == 0, (another, err)
    assert (kept / "model-scale-2" / "config.json").is_file()

    code, out, err = cli("demo", "--keep", kept)  # a second time: one line, before anything is printed
    assert_one_line_error(code, err, 4, str(kept.absolute()), "already exists", "--overwrite")
    assert out == ""

    (kept / "marker").write_text("the old demo\n")
    code, _, err = cli("demo", "--keep", kept, "--overwrite")
    assert code == 0, err
    assert not (kept / "marker").exists() and not leftovers(kept.parent)
    meta = json.loads((kept / "driftmerge-adapter" / "driftmerge.json").read_text())
    assert meta["base"]["ref"] == str((kept / "run" / "base").absolute())  # where the folder now is
    code, _, err = cli("apply", kept / "driftmerge-adapter", "--scale", "2", "-o", "at-2")  # finds its base there
    assert code == 0, err


# ---- 4. a missing two-part path ----------------------------------------------------------------------------------
def test_missing_two_part_path_is_named_as_a_missing_folder(runs, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("extract", "foo/bar", *runs["llama"].checkpoints, "-o", "out")
    assert_one_line_error(code, err, 3, "foo/bar: no such local folder", "Hugging Face cache", "HF_HUB_OFFLINE")
    assert not Path("out").exists()


# ---- 5. export-mergekit: a Hub adapter, and apply's rules for --scale / --step --------------------------------------
def test_export_mergekit_takes_a_hub_adapter(adapter, fake_hub: FakeHub, tmp_path, cli):
    fake_hub.add_repo("alice/tiny-drift", {p.name: p.read_bytes() for p in adapter.iterdir()})
    code, out, err = cli("export-mergekit", "alice/tiny-drift", "--scale", "1.5", "-o", tmp_path / "hub.yaml")
    assert code == 0, err
    assert "driftmerge apply alice/tiny-drift --scale 1.5" in out
    assert cli("export-mergekit", adapter, "--scale", "1.5", "-o", tmp_path / "local.yaml")[0] == 0
    hub, local = (yaml.safe_load((tmp_path / f"{n}.yaml").read_text()) for n in ("hub", "local"))
    assert hub == local  # the same checkpoints, weights and base


@pytest.mark.parametrize(
    "flags, want",
    [(["--scale", "1", "--step", "200"], 2), ([], 2), (["--scale", "nan"], 3), (["--step", "inf"], 3)],
)
def test_export_mergekit_scale_rules_are_apply_s(flags, want, adapter, tmp_path, cli):
    results = [
        cli("apply", adapter, *flags, "-o", tmp_path / "model"),
        cli("export-mergekit", adapter, *flags, "-o", tmp_path / "mk.yaml"),
    ]
    assert [code for code, _, _ in results] == [want, want]
    last_lines = [err.strip().splitlines()[-1] for _, _, err in results]
    assert last_lines[0] == last_lines[1], last_lines
    assert not (tmp_path / "model").exists() and not (tmp_path / "mk.yaml").exists()


def test_export_mergekit_library_raises_apply_s_errors(adapter, tmp_path):
    from driftmerge.commands.export_mergekit import export_mergekit

    targets: list[tuple[float | None, float | None]] = [(float("nan"), None), (None, float("inf")), (1.0, 200.0)]
    for scale, step in [*targets, (None, None)]:
        with pytest.raises(InputError) as apply_exc:
            ApplyOptions(scale=scale, step=step)
        with pytest.raises(InputError) as export_exc:
            export_mergekit(adapter, tmp_path / "mk.yaml", scale=scale, step=step)
        assert str(export_exc.value) == str(apply_exc.value)
    assert not (tmp_path / "mk.yaml").exists()


# ---- 6. the hf command the messages name ---------------------------------------------------------------------------
def test_huggingface_hub_bound_admits_only_versions_with_hf():
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    hub = next(Requirement(d) for d in deps if Requirement(d).name.replace("-", "_") == "huggingface_hub")
    assert not hub.specifier.contains("0.33.2")  # before `hf` (0.34.0)
    assert hub.specifier.contains("0.34.0")
    assert hub.specifier.contains(version("huggingface_hub"))  # what is installed here stays admitted
    assert "hf auth login" in (ROOT / "driftmerge" / "hub" / "refs.py").read_text()
