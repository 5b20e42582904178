"""The extraction pipeline: checkpoints → trajectory fit → low-rank factors → adapter folder.

Tensors stream one name at a time: a reader thread loads the base copy and every checkpoint's copy of the next
names (within the read-ahead share of the memory budget; pinned for CUDA), while the main thread turns the
current one into float32 deltas on the device, fits the line (:class:`LineAccumulator`), and sends the drift
either to a same-shape group awaiting batched factorization (2-D LoRA-able weights) or to the extras. Groups are
factorized whenever the pending drift matrices reach the group share of the budget, so peak memory follows the
budget and the largest tensor, not the model's size or the number of checkpoints.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from driftmerge.commands.distributed import distributed
from driftmerge.commands.options import ExtractOptions
from driftmerge.core.devices import DTYPES, resolve_device, resolve_factor_dtype
from driftmerge.core.factorizer import GroupFactorizer
from driftmerge.core.lowrank import Factor
from driftmerge.core.trajectory import LineAccumulator, TensorFit
from driftmerge.errors import InputError
from driftmerge.hub.cards import adapter_card
from driftmerge.io.adapter import peft_config, write_adapter
from driftmerge.io.architecture import describe
from driftmerge.io.assemble import ExpertQueue, assemble, factor_extra, group_of, placement
from driftmerge.io.checkpoints import Checkpoint, open_run
from driftmerge.io.metadata import build_meta
from driftmerge.io.outputs import atomic_output_dir, check_output_dir
from driftmerge.io.stream import raise_not_finite, stream_deltas
from driftmerge.io.targets import Architecture, Target
from driftmerge.progress import Progress
from driftmerge.schema import DriftMeta, Summary, TensorRecord

logger = logging.getLogger("driftmerge")


@dataclass
class ExtractResult:
    out_dir: Path
    meta: DriftMeta  # what driftmerge.json holds
    summary: Summary  # meta.summary, with adapter_bytes
    ranks: list[tuple[int, int, float]] = field(default_factory=list)  # under torchrun: tensors, bytes, seconds


def extract(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    *,
    out_dir: str | Path,
    options: ExtractOptions | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> ExtractResult:
    """Fit the drift of ``checkpoints`` relative to ``base`` and write a PEFT adapter folder to ``out_dir``
    (replacing it when ``overwrite``), with ``options`` (checked when they were made; default ``ExtractOptions()``).
    ``command`` is recorded in driftmerge.json and the model card; ``progress(done, total, name)`` follows tensors.

    Under ``torchrun`` the tensors are shared among the ranks by bytes (:mod:`driftmerge.commands.distributed`); rank 0
    gathers the factors and writes the adapter, byte-identical to a single-process run.
    """
    opts = options or ExtractOptions()
    if not checkpoints:
        raise InputError("give at least one checkpoint after the base")
    device = resolve_device(opts.device)
    with distributed(cuda=device.type == "cuda") as dist:
        if dist.world > 1 and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        job = dist.run(lambda: _prepare(base, checkpoints, out_dir, opts, overwrite))
        mine = dist.share(
            job.names,
            {n: job.base.infos[n].numel for n in job.names},
            group=lambda n: group_of(n, job.arch.targets.get(n)),
        )
        t0 = time.perf_counter()
        part = dist.run(lambda: _fit_share(job, mine, opts, device, progress))
        read = sum(job.base.infos[n].numel * job.base.infos[n].dtype.itemsize for n in mine)
        part.timing = (len(mine), read, time.perf_counter() - t0)
        parts = dist.gather(part)
        result = dist.run(
            lambda: _write(job, _merge(parts, job.names), opts, device, overwrite, command) if dist.is_main else None
        )
        result = dist.broadcast(result)
        assert result is not None  # rank 0's
        if dist.world > 1:
            result.ranks = [p.timing for p in parts]
        return result


@dataclass
class _Job:
    """What every rank knows before the pass: the inputs, the tensors to fit, their steps."""

    base: Checkpoint
    cks: list[Checkpoint]
    steps: list[int]
    source: str
    arch: Architecture
    names: list[str]
    out_dir: Path
    factor_dtype: str


@dataclass
class _Part:
    """One rank's results (CPU tensors), merged by rank 0."""

    records: dict[str, TensorRecord]
    extras: dict[str, torch.Tensor]
    factors: dict[str, Factor]
    moved: list[bool]  # per checkpoint: does it move any of these tensors?
    timing: tuple[int, int, float] = (0, 0, 0.0)  # tensors, bytes per input, seconds
    slice_sq: dict[str, float] = field(default_factory=dict)  # "name[e]" -> ‖D_e‖² (stored expert stacks)


def _prepare(
    base: str | Path, checkpoints: Sequence[str | Path], out_dir: str | Path, opts: ExtractOptions, overwrite: bool
) -> _Job:
    base_ck, cks, steps, source = open_run(base, checkpoints, steps=opts.steps, base_step=opts.base_step)
    out = Path(out_dir)
    check_output_dir(out, [base_ck.path, *(c.path for c in cks)], overwrite=overwrite)  # fail before the long pass
    arch = describe(
        base_ck.config,
        {n: i.shape for n, i in base_ck.infos.items()},
        folder=base_ck.path,
        guess=opts.guess_modules,
        trust_remote_code=opts.trust_remote_code,
    )
    names = _select(base_ck, opts, arch)
    if not names:
        raise InputError("no floating-point tensors left to fit (check --include / --exclude)")
    _check_rank(opts.rank, [_matrix_shape(base_ck.infos[n].shape, arch.targets[n]) for n in names if n in arch.targets])
    factor_dtype = resolve_factor_dtype(opts.factor_dtype, resolve_device(opts.device))
    return _Job(base_ck, cks, steps, source, arch, names, out, factor_dtype)


def _fit_share(
    job: _Job, names: list[str], opts: ExtractOptions, device: torch.device, progress: Progress | None
) -> _Part:
    """Stream ``names`` through the line fit and factorize the matrices: this rank's share of the work."""
    base_ck, arch = job.base, job.arch
    t = [s - opts.base_step for s in job.steps]
    records: dict[str, TensorRecord] = {}
    extras: dict[str, torch.Tensor] = {}
    read_ahead = min(opts.max_memory // 4, 1 << 30)
    factorizer = GroupFactorizer(opts, DTYPES[job.factor_dtype], opts.max_memory - read_ahead)
    moved = [False] * len(job.cks)
    experts = ExpertQueue(factorizer)
    t_start, stats = time.perf_counter(), {"waited": 0.0}
    sources = [base_ck, *job.cks]
    for done, (name, fit) in enumerate(_stream_fits(names, sources, t, opts.fit, device, read_ahead, stats), 1):
        for j, sq in enumerate(fit.delta_sq_norms):
            moved[j] = moved[j] or sq > 0.0
        norm = float(torch.linalg.vector_norm(fit.drift))
        target = arch.targets.get(name)
        kind = target.kind if target is not None else "other"
        facts: dict[str, Any] = {"shape": list(base_ck.infos[name].shape), "kind": kind, "r2": fit.r2}
        if target is not None:
            facts.update(placement(target))
        if target is not None and target.kind == "experts":  # zero or not, an expert's matrix needs its pieces
            experts.add(fit.drift, target)
        if norm == 0.0:
            records[name] = TensorRecord(**facts, drift_norm=norm, stored="zero")
        elif target is not None:
            records[name] = TensorRecord(**facts, drift_norm=norm, stored="lora")
            if target.kind != "experts":  # PEFT's B A is (out, in): the weight for Linear, its transpose otherwise
                factorizer.add(name, fit.drift, transposed=target.kind in ("embedding", "conv1d"))
        elif factor_extra(name, fit.drift):
            records[name] = TensorRecord(**facts, drift_norm=norm, stored="extras")
            factorizer.add(name, fit.drift.reshape(-1, fit.drift.shape[-1]))  # (prod(shape[:-1]), shape[-1])
        else:
            records[name] = TensorRecord(**facts, drift_norm=norm, stored="extras", energy=1.0)
            extras[name] = fit.drift.cpu()
        del fit
        if progress:
            progress(done, len(names), name)
    experts.finish()
    t_pass = time.perf_counter()
    factors = factorizer.finish()
    logger.info(
        "pass over %d tensors: %.2f s (%.2f s waiting for reads); factorization: %.2f s in all, %.2f s after the pass",
        len(names),
        t_pass - t_start,
        stats["waited"],
        factorizer.seconds,
        time.perf_counter() - t_pass,
    )
    factors = {
        n: Factor(B=f.B.cpu(), A=f.A.cpu(), energy=f.energy, iterations=f.iterations) for n, f in factors.items()
    }
    return _Part(records, extras, factors, moved, slice_sq=experts.sq)


def _merge(parts: list[_Part], names: list[str]) -> _Part:
    """The ranks' parts as one, in the single-process order of ``names`` (so the bytes written are the same)."""
    records = {k: v for p in parts for k, v in p.records.items()}
    extras = {k: v for p in parts for k, v in p.extras.items()}
    factors = {k: v for p in parts for k, v in p.factors.items()}
    moved = [any(col) for col in zip(*(p.moved for p in parts), strict=True)]
    return _Part(
        {n: records[n] for n in names},
        {n: extras[n] for n in names if n in extras},
        factors,  # written in the order of the records
        moved,
        slice_sq={k: v for p in parts for k, v in p.slice_sq.items()},
    )


def _write(
    job: _Job, part: _Part, opts: ExtractOptions, device: torch.device, overwrite: bool, command: str | None
) -> ExtractResult:
    base_ck, cks, records = job.base, job.cks, part.records
    modules, extras = assemble(
        part.factors, records, targets=job.arch.targets, slice_sq=part.slice_sq, extras=part.extras
    )
    for ck, moved in zip(cks, part.moved, strict=True):
        if not moved:
            raise InputError(
                f"{ck.path}: identical to the base in every fitted tensor; give checkpoints from later in training"
            )
    if not modules and not extras:
        raise InputError("the checkpoints do not move any fitted tensor away from the base; check --include/--exclude")

    meta = build_meta(
        base_ck,
        cks,
        steps=job.steps,
        source=job.source,
        opts=opts,
        device=device,
        factor_dtype=job.factor_dtype,
        arch=job.arch,
        records=records,
        command=command,
    )
    summary = meta.summary
    base_name = base_ck.hub["repo_id"] if base_ck.hub else str(base_ck.path.absolute())  # where PEFT finds the base
    config = peft_config(modules, base_name, fan_in_fan_out=job.arch.fan_in_fan_out, task_type=job.arch.task_type)
    inputs = [base_ck.path, *(c.path for c in cks)]
    with atomic_output_dir(job.out_dir, inputs, overwrite=overwrite) as tmp:
        write_adapter(tmp, modules, extras=extras, meta=meta, config=config, card=adapter_card(meta, summary))
        summary.adapter_bytes = sum(f.stat().st_size for f in tmp.iterdir())
    return ExtractResult(out_dir=job.out_dir, meta=meta, summary=summary)


def _matrix_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The matrix one factorization sees: one expert's ``(out, in)`` for an expert stack, else the tensor."""
    return target.dims if target.kind == "experts" and target.dims else shape


def _check_rank(rank: int | float, shapes: list[tuple[int, ...]]) -> None:
    """An integer rank above every LoRA matrix's own limit ``min(m, n)`` is a mistake, not a cap to apply."""
    limit = max((min(s) for s in shapes), default=0)
    if isinstance(rank, int) and limit and rank > limit:
        raise InputError(
            f"--rank {rank} is larger than any fitted matrix allows (at most {limit}); give {limit} or less, "
            "or an energy share such as 0.9"
        )


def _stream_fits(
    names: list[str],
    sources: list[Checkpoint],
    t: list[int],
    fit: str,
    device: torch.device,
    read_ahead: int,
    stats: dict[str, float],
) -> Iterator[tuple[str, TensorFit]]:
    """Yield ``(name, fit)`` per tensor name, from deltas streamed by :func:`stream_deltas`."""
    for name, deltas in stream_deltas(names, sources, device=device, read_ahead=read_ahead, stats=stats):
        acc = LineAccumulator(t, fit)
        for j, delta in deltas:
            if not math.isfinite(acc.add(delta)):  # NaN/Inf in the base or this checkpoint propagate into ‖D‖²
                raise_not_finite(name, sources[0], ckpt=sources[j])
        yield name, acc.finish()


def _select(base: Checkpoint, opts: ExtractOptions, arch: Architecture) -> list[str]:
    """Floating-point tensors, filtered by --include / --exclude, with tied duplicates left out."""
    out = []
    for name, info in base.infos.items():
        if not info.dtype.is_floating_point or name in arch.tied:
            continue
        if opts.include and not re.search(opts.include, name):
            continue
        if opts.exclude and re.search(opts.exclude, name):
            continue
        out.append(name)
    return out
