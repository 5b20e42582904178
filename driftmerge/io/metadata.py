"""``driftmerge.json`` from an extraction: the :class:`~driftmerge.schema.DriftMeta` record of the inputs, steps,
options and per-tensor facts, with the summary printed and put in the model card. The models themselves live in
:mod:`driftmerge.schema` (the Hub cards read them too)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, cast

import torch

from driftmerge import __version__
from driftmerge.hub.refs import base_license, cache_origin
from driftmerge.io.checkpoints import Checkpoint
from driftmerge.io.lora_run import LoraCheckpoint
from driftmerge.io.targets import Architecture
from driftmerge.schema import FORMAT_VERSION, BaseRecord, CheckpointRecord, DriftMeta, HubEntry, Summary, TensorRecord


def build_meta(
    base: Checkpoint,
    cks: Sequence[Checkpoint | LoraCheckpoint],
    *,
    steps: list[int],
    source: str,
    opts: Any,
    device: torch.device,
    factor_dtype: str,
    arch: Architecture,
    records: dict[str, TensorRecord],
    command: str | None,
) -> DriftMeta:
    """The record of one extraction (``records`` complete: every LoRA tensor has its rank and energy)."""
    dtypes = [str(i.dtype).removeprefix("torch.") for i in base.infos.values() if i.dtype.is_floating_point]
    return DriftMeta(
        format_version=FORMAT_VERSION,
        driftmerge_version=__version__,
        base=BaseRecord(
            ref=str(base.path.absolute()),
            step=opts.base_step,
            signature=base.signature(),
            probe=base.probe(),
            license=base_license(base.path),
            hub=_hub(base) or cast("HubEntry | None", cache_origin(base.path)),  # a Hub input, or a cached snapshot
            repo_id=opts.base_model,
        ),
        checkpoints=[
            CheckpointRecord(ref=str(c.path.absolute()), step=s, hub=_hub(c)) for c, s in zip(cks, steps, strict=True)
        ],
        steps_source=source,
        base_step=opts.base_step,
        s_ref=steps[-1],
        fit=opts.fit,
        rank_rule=opts.rank,
        svd=opts.svd,
        seed=opts.seed,
        niter=opts.niter,
        oversample=opts.oversample,
        max_memory=opts.max_memory,
        device=device.type,
        factor_dtype=factor_dtype if opts.svd == "randomized" else None,
        storage_dtype=max(set(dtypes), key=dtypes.count) if dtypes else None,
        adapter_dtype="float32",
        include=opts.include,
        exclude=opts.exclude,
        architecture_source=arch.source,
        fan_in_fan_out=arch.fan_in_fan_out,
        tied=arch.tied,
        command=command,
        tensors=records,
        summary=summarize_records(records, base=base, cks=cks),
    )


def _hub(ck: Checkpoint | LoraCheckpoint) -> HubEntry | None:
    """The ``{repo_id, revision, commit}`` dict :mod:`driftmerge.hub.refs` recorded for a Hub input (validated as the
    record is built), else None: no ``hub`` key is written."""
    return cast("HubEntry | None", ck.hub)


def summarize_records(
    records: dict[str, TensorRecord], *, base: Checkpoint, cks: Sequence[Checkpoint | LoraCheckpoint]
) -> Summary:
    """Totals over ``records``; ``energy_kept`` and ``extras_share`` as defined on :class:`Summary`."""
    lora = [r for r in records.values() if r.stored == "lora"]
    extras = [r for r in records.values() if r.stored == "extras"]
    lora_sq = sum(r.drift_norm**2 for r in lora)
    extras_sq = sum(r.drift_norm**2 for r in extras)
    kept_sq = sum((r.energy or 0.0) * r.drift_norm**2 for r in lora)
    r2s = [r.r2 for r in records.values() if r.r2 is not None]
    ranks = [r.rank for r in lora if r.rank is not None]
    return Summary(
        tensors=len(records),
        lora_tensors=len(lora),
        extras_tensors=len(extras),
        extras_kinds=extras_kinds(records),
        zero_tensors=[n for n, r in records.items() if r.stored == "zero"],
        rank_min=min(ranks, default=0),
        rank_max=max(ranks, default=0),
        energy_kept=kept_sq / lora_sq if lora_sq > 0 else 1.0,
        extras_share=extras_sq / (lora_sq + extras_sq) if lora_sq + extras_sq > 0 else 0.0,
        median_r2=statistics.median(r2s) if r2s else None,
        checkpoint_bytes=cks[-1].weight_bytes,
        base_bytes=base.weight_bytes,
    )


def extras_kinds(records: dict[str, TensorRecord]) -> dict[str, int]:
    """How many extras tensors of each kind: ``factored`` (stored as low-rank factors), ``bias``, ``norm`` (a 1-D
    tensor of a norm layer), ``vector`` (other 1-D), ``matrix`` (other full-rank, 2+ dims); by name and shape."""
    counts: dict[str, int] = {}
    for name, rec in records.items():
        if rec.stored != "extras":
            continue
        leaf = name.rsplit(".", 2)
        if rec.rank is not None:
            kind = "factored"
        elif name.endswith("bias"):
            kind = "bias"
        elif len(rec.shape) == 1 and any("norm" in p or p.startswith("ln") for p in leaf[-2:-1] or [name]):
            kind = "norm"
        else:
            kind = "vector" if len(rec.shape) == 1 else "matrix"
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
