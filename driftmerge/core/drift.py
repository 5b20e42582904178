"""The one formula every writer uses: ``W(scale) = W0 + scale · drift``, and the step ↔ scale map.

``scale = (T - s_base) / (s_ref - s_base)`` for a training step ``T``: scale 1 is the last checkpoint (``s_ref``),
scale 0 the base, and scales above 1 extrapolate along the fitted line (docs/design.md, "Scale").
"""

from __future__ import annotations

from typing import Any

import torch


def scale_for_step(step: float, meta: dict[str, Any]) -> float:
    """``scale = (T - s_base) / (s_ref - s_base)`` from the steps recorded in ``driftmerge.json``."""
    return (step - meta["base_step"]) / (meta["s_ref"] - meta["base_step"])


def step_for_scale(scale: float, meta: dict[str, Any]) -> float:
    return meta["base_step"] + scale * (meta["s_ref"] - meta["base_step"])


def moved(w0: torch.Tensor, drift: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``W = W0 + scale · drift`` in float32, stored as ``dtype``: the one formula every writer uses."""
    return (w0.float() + scale * drift).to(dtype)
