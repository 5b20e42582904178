"""driftmerge: fit the linear weight drift of an RLVR run, store it as a PEFT LoRA adapter, apply it at any scale.

The library never prints; it logs through ``logging`` and reports progress through an optional callback.
"""

from driftmerge.errors import DriftmergeError, InputError, OutputError

__version__ = "0.1.0"

__all__ = ["DriftmergeError", "InputError", "OutputError", "__version__"]
