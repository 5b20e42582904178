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
from driftmerge.core.devices import DTYPES, cpu_workers, resolve_device, resolve_factor_dtype
from driftmerge.core.factored import FactoredFit, factor_product, fit_factored
from driftmerge.core.factorizer import GroupFactorizer
from driftmerge.core.lowrank import Factor
from driftmerge.core.trajectory import LineAccumulator, TensorFit
from driftmerge.errors import InputError
from driftmerge.hub.cards import adapter_card
from driftmerge.io.adapter import peft_config, write_adapter
from driftmerge.io.architecture import describe
from driftmerge.io.assemble import ExpertQueue, assemble, factor_extra, group_of, placement
from driftmerge.io.checkpoints import Checkpoint, open_run
from driftmerge.io.lora_run import LoraCheckpoint, dense_weight, is_lora_run, lora_plan, open_lora_run
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
    lora: list[LoraCheckpoint] = field(default_factory=list)  # a LoRA-trained run's checkpoints (then cks is [])

    @property
    def inputs(self) -> list[Checkpoint | LoraCheckpoint]:
        """The checkpoints in step order, whichever kind the run has."""
        return [*self.cks, *self.lora]


@dataclass
class _Part:
    """One rank's results (CPU tensors), merged by rank 0."""

    records: dict[str, TensorRecord]
    extras: dict[str, torch.Tensor]
    factors: dict[str, Factor]
    moved: list[bool]  # per checkpoint: does it move any of these tensors?
    timing: tuple[int, int, float] = (0, 0, 0.0)  # tensors, bytes per input, seconds
    slice_sq: dict[str, float] = field(default_factory=dict)  # "path[e]" -> ‖D_e‖² (stored expert stacks)


def _prepare(
    base: str | Path, checkpoints: Sequence[str | Path], out_dir: str | Path, opts: ExtractOptions, overwrite: bool
) -> _Job:
    lora: list[LoraCheckpoint] = []
    if is_lora_run(checkpoints):  # a run trained with LoRA: its checkpoints are PEFT adapters
        base_ck, lora, steps, source = open_lora_run(base, checkpoints, steps=opts.steps, base_step=opts.base_step)
        cks: list[Checkpoint] = []
    else:
        base_ck, cks, steps, source = open_run(base, checkpoints, steps=opts.steps, base_step=opts.base_step)
    out = Path(out_dir)
    inputs = [base_ck.path, *(c.path for c in cks), *(c.path for c in lora)]
    check_output_dir(out, inputs, overwrite=overwrite)  # fail before the long pass
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
    return _Job(base_ck, cks, steps, source, arch, names, out, factor_dtype, lora)


class _Store:
    """Where each fitted tensor's drift goes: LoRA factors (batched by the factorizer, or given), an expert
    stack, the extras (factored when large), or nowhere (no drift); one record per tensor."""

    def __init__(
        self, job: _Job, opts: ExtractOptions, factor_budget: int, *, workers: int = 1, batched: bool = False
    ) -> None:
        self.job = job
        self.records: dict[str, TensorRecord] = {}
        self.extras: dict[str, torch.Tensor] = {}
        self.given: dict[str, Factor] = {}
        self.factorizer = GroupFactorizer(
            opts, DTYPES[job.factor_dtype], factor_budget, workers=workers, batched=batched
        )
        self.experts = ExpertQueue(self.factorizer)
        self.moved = [False] * len(job.inputs)

    def _facts(self, name: str, r2: float | None, sq_norms: list[float]) -> tuple[dict[str, Any], Target | None]:
        for j, sq in enumerate(sq_norms):
            self.moved[j] = self.moved[j] or sq > 0.0
        target = self.job.arch.targets.get(name)
        facts: dict[str, Any] = {
            "shape": list(self.job.base.infos[name].shape),
            "kind": target.kind if target is not None else "other",
            "r2": r2,
        }
        return facts | (placement(target) if target is not None else {}), target

    def add(self, name: str, fit: TensorFit) -> None:
        """A dense drift: to the factorizer, an expert stack, or the extras."""
        facts, target = self._facts(name, fit.r2, fit.delta_sq_norms)
        norm = fit.drift_sq_norm**0.5
        if target is not None and target.kind == "experts":  # zero or not, an expert's matrix needs its pieces
            self.experts.add(fit.drift, target)
        if norm == 0.0:
            self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="zero")
        elif target is not None:
            self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="lora")
            if target.kind != "experts":  # PEFT's B A is (out, in): the weight for Linear, its transpose otherwise
                self.factorizer.add(
                    name, fit.drift, transposed=target.kind in ("embedding", "conv1d"), sq_norm=fit.drift_sq_norm
                )
        elif factor_extra(name, fit.drift):
            self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="extras")
            flat = fit.drift.reshape(-1, fit.drift.shape[-1])  # (prod(shape[:-1]), shape[-1])
            self.factorizer.add(name, flat, sq_norm=fit.drift_sq_norm)
        else:
            self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="extras", energy=1.0)
            self.extras[name] = fit.drift.cpu()

    def add_factored(self, name: str, fit: FactoredFit, *, rank: int | float) -> None:
        """A drift ``U V`` of low-rank updates (a LoRA-trained module): factorized exactly, never dense."""
        facts, target = self._facts(name, fit.r2, fit.delta_sq_norms)
        norm = fit.drift_sq_norm**0.5
        if norm == 0.0 or target is None:
            self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="zero")
            return
        self.records[name] = TensorRecord(**facts, drift_norm=norm, stored="lora")
        self.given[name] = factor_product(fit.U, fit.V, rule=rank)

    def untouched(self, name: str) -> None:
        """A tensor no checkpoint changes (a LoRA run leaves it at the base)."""
        facts, _ = self._facts(name, None, [])
        self.records[name] = TensorRecord(**facts, drift_norm=0.0, stored="zero")

    def part(self) -> _Part:
        self.experts.finish()
        t0, fz = time.perf_counter(), self.factorizer
        factors = fz.finish() | self.given
        after = time.perf_counter() - t0
        logger.info("factorization: %.2f s in all (%d at a time), %.2f s after the pass", fz.seconds, fz.workers, after)
        factors = {
            n: Factor(B=f.B.cpu(), A=f.A.cpu(), energy=f.energy, iterations=f.iterations) for n, f in factors.items()
        }
        return _Part(self.records, self.extras, factors, self.moved, slice_sq=self.experts.sq)


def _fit_share(
    job: _Job, names: list[str], opts: ExtractOptions, device: torch.device, progress: Progress | None
) -> _Part:
    """Stream ``names`` through the line fit and factorize the matrices: this rank's share of the work."""
    if job.lora:
        return _fit_share_lora(job, names, opts, device, progress)
    t = [s - opts.base_step for s in job.steps]
    read_ahead = min(opts.max_memory // 4, 1 << 30)
    with cpu_workers(device) as workers:
        store = _Store(job, opts, opts.max_memory - read_ahead, workers=workers, batched=device.type != "cpu")
        try:
            t_start, stats = time.perf_counter(), {"waited": 0.0}
            sources = [job.base, *job.cks]
            fits = _stream_fits(names, sources, t, opts.fit, device, read_ahead, stats)
            for done, (name, fit) in enumerate(fits, 1):
                store.add(name, fit)
                del fit
                if progress:
                    progress(done, len(names), name)
            logger.info(
                "pass over %d tensors: %.2f s (%.2f s waiting for reads)",
                len(names),
                time.perf_counter() - t_start,
                stats["waited"],
            )
            return store.part()
        finally:
            store.factorizer.close()


def _fit_share_lora(
    job: _Job, names: list[str], opts: ExtractOptions, device: torch.device, progress: Progress | None
) -> _Part:
    """A LoRA-trained run: each LoRA module's line from its checkpoints' factors (:mod:`driftmerge.core.factored`),
    ``modules_to_save`` copies and trainable tokens as dense drifts, every other tensor untouched."""
    t = [s - opts.base_step for s in job.steps]
    store = _Store(job, opts, opts.max_memory)
    plan = lora_plan(job.base, job.lora, targets=job.arch.targets)
    for done, name in enumerate(names, 1):
        how = plan.get(name)
        if how is None:
            store.untouched(name)
        elif how[0] == "lora":
            ups = [ck.update(how[1]) for ck in job.lora]  # (s B, A) per checkpoint, PEFT's orientation
            fit = fit_factored([b.to(device) for b, _ in ups], [a.to(device) for _, a in ups], t=t, fit=opts.fit)
            store.add_factored(name, fit, rank=opts.rank)
        else:
            w0 = job.base.get(name).to(device).float()
            acc = LineAccumulator(t, opts.fit)
            for ck in job.lora:
                acc.add(dense_weight(ck, how, w0=w0) - w0)
            store.add(name, acc.finish())
        if progress:
            progress(done, len(names), name)
    return store.part()


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
    base_ck, cks, records = job.base, job.inputs, part.records
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
    base_name = meta.base.hub_id  # where PEFT finds the base: its Hub id, or null for a local folder (no path)
    config = peft_config(modules, base_name, fan_in_fan_out=job.arch.fan_in_fan_out, task_type=job.arch.task_type)
    inputs = [base_ck.path, *(c.path for c in cks)]
    with atomic_output_dir(job.out_dir, inputs, overwrite=overwrite) as tmp:
        write_adapter(
            tmp,
            modules,
            extras=extras,
            meta=meta,
            config=config,
            card=adapter_card(meta, summary, where=job.out_dir.name),
        )
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
