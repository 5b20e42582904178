"""driftmerge: fit the linear weight drift of an RLVR run, store it as a PEFT LoRA adapter, apply it at any scale.

The library never prints; it logs through ``logging`` and reports progress through an optional callback. The main
entry points load lazily (``import driftmerge`` stays light; torch loads on first use):

>>> from driftmerge import ApplyOptions, ExtractOptions, apply_drift, extract  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from driftmerge.errors import DriftmergeError, InputError, OutputError

if TYPE_CHECKING:
    from driftmerge.commands.apply import apply_drift
    from driftmerge.commands.extract import extract
    from driftmerge.commands.options import ApplyOptions, ExtractOptions

__version__ = "0.1.0"

_LAZY = {
    "extract": "driftmerge.commands.extract",
    "apply_drift": "driftmerge.commands.apply",
    "ExtractOptions": "driftmerge.commands.options",
    "ApplyOptions": "driftmerge.commands.options",
}

__all__ = [
    "ApplyOptions",
    "DriftmergeError",
    "ExtractOptions",
    "InputError",
    "OutputError",
    "__version__",
    "apply_drift",
    "extract",
]


def __getattr__(name: str) -> Any:
    """``driftmerge.extract`` and friends, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'driftmerge' has no attribute {name!r}")
