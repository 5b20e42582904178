"""A loaded model moved along the drift in place: one load, then any number of scales.

``set_scale(s)`` rewrites every drifted parameter as ``W = W0 + s · drift`` (float32, then the model's dtype), the
formula ``apply`` uses, with ``W0`` re-read from the base's memory-mapped weights. So the weights at every scale are
exactly those ``apply --scale s`` writes (on the CPU; on CUDA the ``B A`` product may round differently in the last
bit), whatever order the scales come in. An incremental ``W += (s_new - s_old) · drift`` would save the read but
accumulate a rounding per step: in bfloat16, a few sweeps drift visibly from ``apply``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from driftmerge.core.drift import moved
from driftmerge.errors import InputError
from driftmerge.io.models import load_causal_lm
from driftmerge.io.sources import delta_sources, open_adapter, open_base
from driftmerge.schema import DriftMeta


class DriftedModel:
    """The base model of an adapter, loaded once with transformers, movable to any scale along the drift."""

    def __init__(
        self,
        adapter: str | Path,
        base: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        allow_other_base: bool = False,  # as apply's: move a base whose weights differ from the recorded one
    ):
        self.adapter_dir, self.adapter = open_adapter(adapter)
        self.base = open_base(self.adapter, base, allow_other_base=allow_other_base)
        self.model = load_causal_lm(self.base.path, device)
        self.device = next(self.model.parameters()).device
        self._deltas = delta_sources(self.adapter)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        missing = [n for n in self._deltas if n not in params]
        if missing:
            raise InputError(
                f"{self.base.path}: the transformers model has no parameter {missing[0]} (named in the adapter);"
                " its checkpoint names differ from the model's"
            )
        self._params = {n: params[n] for n in self._deltas}
        self.scale = 0.0

    @property
    def meta(self) -> DriftMeta:
        return self.adapter.meta

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        """Move the model to ``W0 + scale · drift`` (tied weights move once, together)."""
        for name, param in self._params.items():
            drift = self._deltas[name]().to(self.device)
            w0 = self.base.get(name).to(self.device)
            param.copy_(moved(w0, drift, scale=scale, dtype=param.dtype).view_as(param))
        self.scale = scale

    def close(self) -> None:
        self.base.close()
