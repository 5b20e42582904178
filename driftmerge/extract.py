"""The extraction pipeline: checkpoints → trajectory fit → low-rank factors → adapter folder.

Tensors stream one at a time: for each tensor name the base copy and each checkpoint's copy are read in turn
(one shard handle per file, memory-mapped), the deltas feed a :class:`LineAccumulator`, and the fitted drift
either waits in a same-shape group for batched factorization (2-D LoRA-able weights) or goes to the extras.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from driftmerge import __version__
from driftmerge.adapter import FORMAT_VERSION, LoraModule, peft_config, write_adapter
from driftmerge.architecture import Architecture, describe
from driftmerge.cards import adapter_card
from driftmerge.checkpoints import Checkpoint, check_compatible, resolve_steps
from driftmerge.errors import InputError
from driftmerge.lowrank import SVD_METHODS, factorize, matrix_seed
from driftmerge.outputs import atomic_output_dir, check_output_dir
from driftmerge.trajectory import FITS, LineAccumulator

logger = logging.getLogger("driftmerge")

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractOptions:
    fit: str = "lsq"  # lsq | pca | endpoint (DESIGN §3)
    rank: int | float = 1  # int: fixed rank; float in (0, 1]: energy share to keep
    svd: str = "randomized"  # randomized | exact
    device: str = "auto"  # auto | cpu | cuda[:i] — where the factorization runs
    factor_dtype: str = "float32"  # matmul dtype of the randomized factorization
    include: str | None = None  # regex: only tensors whose name matches (re.search)
    exclude: str | None = None  # regex: leave out tensors whose name matches
    seed: int = 0  # seeds the randomized factorization
    steps: Sequence[int] | None = None  # checkpoint steps; default from folder names, else 1..N
    base_step: int = 0  # step of the base
    niter: int = 2  # power iterations of the randomized factorization
    oversample: int = 8  # extra sketch columns of the randomized factorization
    max_group_bytes: int = 1 << 30  # drift matrices waiting for batched factorization, at most

    def validate(self) -> None:
        if self.fit not in FITS:
            raise InputError(f"--fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.svd not in SVD_METHODS:
            raise InputError(f"--svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        if self.factor_dtype not in DTYPES:
            raise InputError(f"--factor-dtype must be one of {', '.join(DTYPES)}, got {self.factor_dtype!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, float)):
            raise InputError(f"--rank must be a positive integer or a share in (0, 1], got {self.rank!r}")
        if isinstance(self.rank, int) and self.rank < 1:
            raise InputError(f"--rank must be at least 1, got {self.rank}")
        if isinstance(self.rank, float) and not 0.0 < self.rank <= 1.0:
            raise InputError(f"--rank as a share must lie in (0, 1], got {self.rank}")
        for flag, rx in (("--include", self.include), ("--exclude", self.exclude)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as exc:
                    raise InputError(f"{flag}: not a valid regular expression ({exc})") from exc


@dataclass
class ExtractResult:
    out_dir: Path
    meta: dict[str, Any]  # what driftmerge.json holds
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device: unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    return dev


def extract(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    options: ExtractOptions | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> ExtractResult:
    """Fit the drift of ``checkpoints`` relative to ``base`` and write a PEFT adapter folder to ``out_dir``."""
    opts = options or ExtractOptions()
    opts.validate()
    if not checkpoints:
        raise InputError("give at least one checkpoint after the base")
    device = resolve_device(opts.device)
    base_ck = Checkpoint(base)
    cks = [Checkpoint(p) for p in checkpoints]
    steps, order, source = resolve_steps([c.path for c in cks], opts.steps, opts.base_step)
    cks = [cks[i] for i in order]
    check_compatible(base_ck, cks)
    out_dir = Path(out_dir)
    inputs = [base_ck.path, *(c.path for c in cks)]
    check_output_dir(out_dir, inputs, overwrite)  # fail before the long pass, not after it

    arch = describe(base_ck.config, {n: i.shape for n, i in base_ck.infos.items()})
    names = _select(base_ck, opts, arch)
    if not names:
        raise InputError("no floating-point tensors left to fit (check --include / --exclude)")
    t = [s - opts.base_step for s in steps]
    records: dict[str, dict[str, Any]] = {}
    extras: dict[str, torch.Tensor] = {}
    factorizer = _GroupFactorizer(opts, device)
    ckpt_sq = [0.0] * len(cks)

    for done, name in enumerate(names, 1):
        w0 = _finite(base_ck, name)
        acc = LineAccumulator(t, opts.fit)
        for ck in cks:
            acc.add(_finite(ck, name) - w0)
        fit = acc.finish()
        for j, sq in enumerate(fit.delta_sq_norms):
            ckpt_sq[j] += sq
        norm = float(torch.linalg.vector_norm(fit.drift, dtype=torch.float64))
        kind = arch.kinds.get(name)
        rec = {"shape": list(w0.shape), "kind": kind or "other", "drift_norm": norm, "r2": fit.r2}
        records[name] = rec
        if norm == 0.0:
            rec.update(stored="zero", rank=None, energy=None)
        elif kind is not None:
            rec.update(stored="lora", module=arch.modules[name])
            matrix = fit.drift.T if kind in ("embedding", "conv1d") else fit.drift  # (out, in) as PEFT's B A
            factorizer.add(name, matrix)
        else:
            rec.update(stored="extras", rank=None, energy=1.0)
            extras[name] = fit.drift
        if progress:
            progress(done, len(names), name)
    modules: dict[str, LoraModule] = {}
    for name, factor in factorizer.finish().items():
        rec = records[name]
        if factor.rank == 0:  # drift below round-off: never write a rank-0 LoRA entry
            rec.update(stored="zero", rank=None, energy=None)
            continue
        rec.update(rank=factor.rank, energy=factor.energy)
        modules[rec["module"]] = LoraModule(name, rec["kind"], factor.A, factor.B)

    for j, ck in enumerate(cks):
        if ckpt_sq[j] == 0.0:
            raise InputError(f"{ck.path}: identical to the base in every fitted tensor; nothing to extract")
    if not modules and not extras:
        raise InputError("the checkpoints do not move any fitted tensor away from the base")

    meta = _meta(base_ck, cks, steps, source, opts, device, arch, records, command)
    summary = _summary(records, base_ck, cks)
    meta["summary"] = summary
    config = peft_config(modules, str(base_ck.path.absolute()), arch.fan_in_fan_out)
    with atomic_output_dir(out_dir, inputs, overwrite) as tmp:
        write_adapter(tmp, modules, extras, meta, config, adapter_card(meta, summary))
        summary["adapter_bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
    return ExtractResult(out_dir=out_dir, meta=meta, summary=summary)


def _finite(ck: Checkpoint, name: str) -> torch.Tensor:
    x = ck.get(name).float()
    if not torch.isfinite(x).all():
        raise InputError(f"{ck.path}: tensor {name} holds NaN or Inf values")
    return x


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


class _GroupFactorizer:
    """Collect drift matrices by shape and factorize each group as one batch, within a memory budget."""

    def __init__(self, opts: ExtractOptions, device: torch.device):
        self.opts, self.device = opts, device
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        self.pending_bytes = 0
        self.done: dict[str, Any] = {}

    def add(self, name: str, matrix: torch.Tensor) -> None:
        self.pending.setdefault(tuple(matrix.shape), []).append((name, matrix))
        self.pending_bytes += matrix.numel() * 4
        if self.pending_bytes >= self.opts.max_group_bytes:
            self._flush()

    def finish(self) -> dict[str, Any]:
        self._flush()
        return self.done

    def _flush(self) -> None:
        o = self.opts
        for group in self.pending.values():
            batch = torch.stack([m for _, m in group]).to(self.device)  # (b, m, n)
            seeds = [matrix_seed(o.seed, name) for name, _ in group]
            factors = factorize(batch, o.rank, seeds, o.svd, o.niter, o.oversample, DTYPES[o.factor_dtype])
            self.done.update({name: f for (name, _), f in zip(group, factors, strict=True)})
        self.pending.clear()
        self.pending_bytes = 0


def _meta(
    base: Checkpoint,
    cks: list[Checkpoint],
    steps: list[int],
    source: str,
    opts: ExtractOptions,
    device: torch.device,
    arch: Architecture,
    records: dict[str, dict[str, Any]],
    command: str | None,
) -> dict[str, Any]:
    dtypes = [str(i.dtype).removeprefix("torch.") for i in base.infos.values() if i.dtype.is_floating_point]
    return {
        "format_version": FORMAT_VERSION,
        "driftmerge_version": __version__,
        "base": {
            "ref": str(base.path.absolute()),
            "step": opts.base_step,
            "signature": base.signature(),
            "probe": base.probe(),
        },
        "checkpoints": [{"ref": str(c.path.absolute()), "step": s} for c, s in zip(cks, steps, strict=True)],
        "steps_source": source,
        "base_step": opts.base_step,
        "s_ref": steps[-1],
        "fit": opts.fit,
        "rank_rule": opts.rank,
        "svd": opts.svd,
        "seed": opts.seed,
        "niter": opts.niter,
        "oversample": opts.oversample,
        "device": device.type,
        "factor_dtype": opts.factor_dtype,
        "storage_dtype": max(set(dtypes), key=dtypes.count) if dtypes else None,
        "adapter_dtype": "float32",
        "include": opts.include,
        "exclude": opts.exclude,
        "architecture_source": arch.source,
        "fan_in_fan_out": arch.fan_in_fan_out,
        "tied": arch.tied,
        "command": command,
        "tensors": records,
    }


def _summary(records: dict[str, dict[str, Any]], base: Checkpoint, cks: list[Checkpoint]) -> dict[str, Any]:
    lora = [r for r in records.values() if r["stored"] == "lora"]
    extras = [r for r in records.values() if r["stored"] == "extras"]
    lora_sq = sum(r["drift_norm"] ** 2 for r in lora)
    extras_sq = sum(r["drift_norm"] ** 2 for r in extras)
    kept_sq = sum(r["energy"] * r["drift_norm"] ** 2 for r in lora)
    r2s = [r["r2"] for r in records.values() if r["r2"] is not None]
    ranks = [r["rank"] for r in lora]
    return {
        "tensors": len(records),
        "lora_tensors": len(lora),
        "extras_tensors": len(extras),
        "zero_tensors": [n for n, r in records.items() if r["stored"] == "zero"],
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "energy_kept": kept_sq / lora_sq if lora_sq > 0 else 1.0,
        "extras_share": extras_sq / (lora_sq + extras_sq) if lora_sq + extras_sq > 0 else 0.0,
        "median_r2": statistics.median(r2s) if r2s else None,
        "checkpoint_bytes": cks[-1].weight_bytes,
        "base_bytes": base.weight_bytes,
    }
