"""What ``apply`` reads: the adapter (a folder or a Hub repo), the base checked against it, the drift per tensor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from driftmerge.errors import InputError
from driftmerge.hub.refs import resolve, resolve_recorded
from driftmerge.io.adapter import Adapter, Extra, extra_delta, read_adapter
from driftmerge.io.checkpoints import Checkpoint, open_ref

logger = logging.getLogger("driftmerge")


def open_adapter(ref: str | Path) -> tuple[Path, Adapter]:
    """An adapter folder, or a Hub adapter repo fetched into the cache: (its local folder, its contents)."""
    folder = resolve(ref, "adapter").path
    return folder, read_adapter(folder)


def open_base(adapter: Adapter, base: str | Path | None = None) -> Checkpoint:
    """``base`` (a folder or Hub ref), else the base the adapter records (refetched at its commit when gone),
    checked against the adapter."""
    base_ck = open_ref(base) if base is not None else open_ref("", resolve_recorded(adapter.meta.base.model_dump()))
    check_matches_base(adapter, base_ck)
    return base_ck


def check_matches_base(adapter: Adapter, base: Checkpoint) -> None:
    """The base must have the recorded architecture; other weights of that architecture only get a warning."""
    recorded = adapter.meta.base
    if recorded.signature and recorded.signature != base.signature():
        raise InputError(
            f"{base.path}: its tensors (names, shapes or dtypes) differ from those of the base this adapter was made"
            f" from ({recorded.ref}); this adapter was made from another base"
        )
    if recorded.probe and recorded.probe != base.probe():
        logger.warning(
            "%s has the architecture of the adapter's base %s but other weights; applying the drift anyway",
            base.path,
            recorded.ref,
        )
    for name, rec in adapter.meta.tensors.items():
        if rec.stored not in ("lora", "extras"):
            continue
        info = base.infos.get(name)
        if info is None:
            raise InputError(f"{base.path}: has no tensor {name}; this adapter was made from another base")
        if list(info.shape) != rec.shape:
            raise InputError(
                f"{base.path}: tensor {name} has shape {list(info.shape)}, the adapter expects {rec.shape};"
                " this adapter was made from another base"
            )


def delta_sources(adapter: Adapter) -> dict[str, Callable[[], torch.Tensor]]:
    """Tensor name -> a callable giving its float32 drift (``B A`` for LoRA modules, the extras as stored)."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name, mod in adapter.by_tensor.items():
        out[name] = mod.delta
    for name, d in adapter.extras.items():
        out[name] = _stored(d)
    for tied, target in adapter.meta.tied.items():
        if target in out:
            out[tied] = out[target]  # tied weights move together
    return out


def _stored(drift: Extra) -> Callable[[], torch.Tensor]:
    """A source that gives an extras drift (a full-rank one is already the float32 drift)."""
    return lambda: extra_delta(drift)
