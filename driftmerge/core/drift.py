"""The one formula every writer uses: ``W(scale) = W0 + scale · drift``, and the step ↔ scale map.

``scale = (T - s_base) / (s_ref - s_base)`` for a training step ``T``: scale 1 is the last checkpoint (``s_ref``),
scale 0 the base, and scales above 1 extrapolate along the fitted line (docs/design.md §2.5).
"""

from __future__ import annotations

import torch


def scale_for_step(step: float, *, base_step: float, s_ref: float) -> float:
    """``scale = (T - s_base) / (s_ref - s_base)`` for step ``T``, with the steps ``driftmerge.json`` records."""
    return (step - base_step) / (s_ref - base_step)


def step_for_scale(scale: float, *, base_step: float, s_ref: float) -> float:
    """``T = s_base + scale · (s_ref - s_base)``: the inverse of :func:`scale_for_step`."""
    return base_step + scale * (s_ref - base_step)


def moved(w0: torch.Tensor, drift: torch.Tensor, *, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``W = W0 + scale · drift`` in float32, stored as ``dtype``: the one formula every writer uses."""
    return (w0.float() + scale * drift).to(dtype)
