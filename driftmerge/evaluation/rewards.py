"""Verifiable rewards: score a completion against a record's ``answer``.

A reward is a function ``(prompt, completion, answer) -> float``. Built in:

- ``exact-number``: the last number in the completion (``-1,234.50``, ``3/4``, ``1e-3``; thousands separators and a
  trailing period are fine) equals the answer as a number (relative tolerance 1e-6); 1.0 or 0.0.
- ``boxed``: the content of the last ``\\boxed{…}`` (nested braces allowed) equals the answer, compared as numbers
  when both are numbers, else as strings after removing spaces and a surrounding ``$…$``; 1.0 or 0.0.

Anything else names a Python function: ``package.module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from driftmerge.errors import InputError

Reward = Callable[[str, str, str | None], float]  # (prompt, completion, answer or None) -> reward

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?")


def parse_number(text: str) -> float | None:
    """``text`` as a number (``1,234.5``, ``-3/4``, ``2e3``, ``$5$``), else None."""
    t = text.strip().strip("$").strip().rstrip(".").replace(",", "")
    t = re.sub(r"^\\frac\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t)
    if not t:
        return None
    try:
        return float(Fraction(t)) if "/" in t else float(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(completion: str) -> float | None:
    """The last number written in ``completion``, or None when there is none."""
    for m in reversed(list(_NUMBER.finditer(completion))):
        if any(c.isdigit() for c in m.group(0)):
            return parse_number(m.group(0))
    return None


def last_boxed(completion: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (braces balanced), or None."""
    start = completion.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[j], 0)
        if depth == 0:
            return completion[i:j]
    return None


def _same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def exact_number(prompt: str, completion: str, answer: str | None) -> float:
    """1.0 when the completion's last number equals the answer, else 0.0."""
    return float(_same_number(last_number(completion), parse_number(str(answer))))


def boxed(prompt: str, completion: str, answer: str | None) -> float:
    """1.0 when the last ``\\boxed{…}`` holds the answer, else 0.0."""
    got = last_boxed(completion)
    if got is None:
        return 0.0
    a, b = parse_number(got), parse_number(str(answer))
    if a is not None and b is not None:
        return float(_same_number(a, b))
    norm = lambda s: re.sub(r"\s+", "", s.strip().strip("$"))  # noqa: E731
    return float(norm(got) == norm(str(answer)))


BUILT_IN: dict[str, Reward] = {"exact-number": exact_number, "boxed": boxed}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or ``module:function`` / ``file.py:function``."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if ":" not in spec:
        raise InputError(f"--reward {spec!r}: give exact-number, boxed, or MODULE:FUNCTION / FILE.py:FUNCTION")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise InputError(f"--reward {spec!r}: no file {where}")
            loaded = importlib.util.spec_from_file_location(f"driftmerge_reward_{path.stem}", path)
            if loaded is None or loaded.loader is None:
                raise InputError(f"--reward {spec!r}: {where} cannot be imported as a Python file")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except InputError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise InputError(f"--reward {spec!r}: cannot import {where} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec!r}: {where} has no function {name}")
    return fn
