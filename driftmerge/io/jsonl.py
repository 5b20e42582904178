"""JSON-lines input files (prompts to score, prompt/response pairs to teacher-force), read with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError


def read_records(path: str | Path, fields: tuple[str, ...], *, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of ``path``; each record a JSON object whose ``fields``
    are strings. ``what`` names the records in errors (``"prompts"``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file (JSON lines with {_names(fields)} on each line)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) for f in fields):
            raise InputError(f"{path}:{n}: each line needs string fields {_names(fields)}")
        out.append((n, rec))
    if not out:
        raise InputError(f"{path}: no {what} in it")
    return out


def _names(fields: tuple[str, ...]) -> str:
    return " and ".join(f"'{f}'" for f in fields)
