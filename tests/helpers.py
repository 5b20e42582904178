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
