"""Promises about the project itself: the README's commands, CI, and the recipes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import load_weights

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up.*?```\n(.*?)```", text, re.S)
    assert block, "README has no set-up block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_setup_is_two_commands_and_ci_runs_the_test_one():
    cmds = readme_setup_commands()
    assert len(cmds) == 2
    assert "driftmerge demo" in cmds[0] and "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_recipe_runs_as_is(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path / "w"), "RANK": "2", "SCALE": "1.25"}
    proc = subprocess.run(
        ["bash", str(ROOT / "recipes" / "extract-apply.sh")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "scale 1.25 (step 750)" in proc.stdout  # the shipped run: checkpoints 150..600
    weights = load_weights(tmp_path / "w" / "model")
    assert weights and (tmp_path / "w" / "adapter-scaled" / "adapter_config.json").is_file()
