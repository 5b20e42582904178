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


def open_base(adapter: Adapter, base: str | Path | None = None, *, allow_other_base: bool = False) -> Checkpoint:
    """``base`` (a folder or Hub ref), else the base the adapter records (refetched at its commit when gone),
    checked against the adapter. Weights other than the recorded base's (a checkpoint of the run, say) are refused
    unless ``allow_other_base``: ``W0' + s · drift`` on a checkpoint counts the drift it already holds twice."""
    base_ck = open_ref(base) if base is not None else open_ref("", resolve_recorded(adapter.meta.base.model_dump()))
    check_matches_base(adapter, base_ck, other_weights="warn" if allow_other_base else "refuse")
    return base_ck


def check_matches_base(adapter: Adapter, base: Checkpoint, *, other_weights: str = "warn") -> None:
    """The base must have the recorded architecture. Other weights of that architecture (their probe differs)
    get a warning, or with ``other_weights="refuse"`` one :class:`InputError` line naming the override flag."""
    recorded = adapter.meta.base
    if recorded.signature and recorded.signature != base.signature():
        raise InputError(
            f"{base.path}: its tensors (names, shapes or dtypes) differ from those of the base this adapter was made"
            f" from ({recorded.ref}); this adapter was made from another base"
        )
    if recorded.probe and recorded.probe != base.probe():
        if other_weights == "refuse":
            raise InputError(_other_base(adapter, base.path))
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


def _other_base(adapter: Adapter, path: Path) -> str:
    """Why weights other than the recorded base's are refused, naming the run's checkpoint when it is one."""
    meta = adapter.meta
    if path.resolve() == Path(meta.base.ref).resolve():  # the recorded folder itself
        return (
            f"{path}: its weights changed since this adapter was fitted from it; restore the base (or extract"
            " again), or pass --allow-other-base to move these weights on purpose"
        )
    same = [c for c in meta.checkpoints if Path(c.ref).exists() and Path(c.ref).resolve() == path.resolve()]
    if same:
        what, held = f"is the run's checkpoint at step {same[0].step}, not", f"up to step {same[0].step}"
    else:
        what, held = "holds other weights than", "it may already hold (a checkpoint of the run?)"
    return (
        f"{path}: {what} the base this adapter was fitted from ({meta.base.ref}); W0 + s·drift on it would count the"
        f" drift {held} twice: leave out --base and choose the point with --scale or --step, or pass"
        " --allow-other-base to move these weights on purpose"
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
