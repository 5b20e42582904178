"""The one formula every writer uses: ``W(scale) = W0 + scale · drift``, and the step ↔ scale map.

``scale = (T - s_base) / (s_ref - s_base)`` for a training step ``T``: scale 1 is the last checkpoint (``s_ref``),
scale 0 the base, and scales above 1 extrapolate along the fitted line (docs/design.md §2.5).
"""

from __future__ import annotations

import math

import torch

from driftmerge.errors import InputError


def scale_for_step(step: float, *, base_step: float, s_ref: float) -> float:
    """``scale = (T - s_base) / (s_ref - s_base)`` for step ``T``, with the steps ``driftmerge.json`` records."""
    return (step - base_step) / (s_ref - base_step)


def step_for_scale(scale: float, *, base_step: float, s_ref: float) -> float:
    """``T = s_base + scale · (s_ref - s_base)``: the inverse of :func:`scale_for_step`."""
    return base_step + scale * (s_ref - base_step)


def scale_and_step(scale: float | None, step: float | None, *, base_step: float, s_ref: float) -> tuple[float, float]:
    """``(scale, step)`` for a target given as one of them (``step`` when ``scale`` is None), through
    :func:`scale_for_step` / :func:`step_for_scale`: the one place ``apply`` and ``export-mergekit`` map it. A scale
    that is not a finite number (a step too far for floats) is refused."""
    if scale is None:
        if step is None:
            raise InputError("give exactly one of --scale or --step")
        scale = scale_for_step(step, base_step=base_step, s_ref=s_ref)
    if not math.isfinite(scale):
        raise InputError(f"the scale must be a finite number, got {scale}")
    return scale, step_for_scale(scale, base_step=base_step, s_ref=s_ref)


def moved(w0: torch.Tensor, drift: torch.Tensor, *, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``W = W0 + scale · drift`` in float32, stored as ``dtype``: the one formula every writer uses."""
    return (w0.float() + scale * drift).to(dtype)
