"""Device names as driftmerge takes them (``--device``, a recipe's ``device``), checked without loading torch;
:func:`driftmerge.core.devices.resolve_device` turns one into a ``torch.device``."""

from __future__ import annotations

import re

DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")  # the one rule: auto, cpu, cuda or cuda:i
DEVICE_CHOICES = "auto, cpu or cuda[:i]"


def is_device(name: str) -> bool:
    """Whether ``name`` is a device driftmerge can run on (``auto`` = cuda when present, else cpu)."""
    return DEVICE.fullmatch(name) is not None
