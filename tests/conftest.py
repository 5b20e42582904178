"""Shared fixtures: tiny planted runs built in-process (no network), reused across tests where read-only."""

from __future__ import annotations

import pytest
import torch
from synthetic import SyntheticRun, make_run

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> None:
    """No test reaches the real Hub: offline mode for this process and its children (``fake_hub`` lifts it)."""
    import huggingface_hub.constants as hf

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(autouse=True, scope="session")
def _no_architecture_cache() -> None:
    """No test writes to the user's cache, and every test builds its skeleton (the cache has its own tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTMERGE_CACHE", "off")
        yield


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``cli("extract", …)`` runs the console script in-process: (exit code, stdout, stderr)."""
    from helpers import run_cli

    return lambda *args: run_cli(list(args), monkeypatch, capsys)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticRun]:
    """One read-only planted run per architecture: 3 checkpoints, a little noise."""
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        out[arch] = make_run(tmp_path_factory.mktemp(arch), arch=arch, noise=0.05, seed=1)
    return out
