"""Helpers the tests share (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single or sharded safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the console script in-process; return (exit code, stdout, stderr)."""
    from driftmerge_cli.main import main

    monkeypatch.setattr(sys, "argv", ["driftmerge", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out, err


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings an output folder may leave (``.NAME.tmp-…`` / ``.NAME.old-…``)."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


def assert_one_line_error(code: int, err: str, want_code: int, *fragments: str) -> None:
    """One line ``driftmerge: error: …`` holding every fragment, the wanted exit code, no traceback."""
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("driftmerge: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
