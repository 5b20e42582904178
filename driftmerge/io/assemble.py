"""From drift matrices to PEFT targets: expert stacks in PEFT's layout, and the factored extras.

An expert stack's unit of factorization is one expert's ``(out, in)`` matrix as the loaded model holds it (the rank
rule applies to it): a stored ``(E, ·, ·)`` stack gives its slices; per-expert checkpoint keys that transformers
fuses (``experts.N.w1`` and ``experts.N.w3`` → rows of ``experts.gate_up_proj[N]``) are gathered into that matrix
first (:class:`ExpertQueue`; a piece that never comes, e.g. left out by ``--exclude``, counts as zero drift). Each
matrix is factorized as ``path[e]``. PEFT's ``lora.ParamWrapper`` keeps one rank per target, so experts of lower
rank are padded with zeros up to ``r = max_e r_e``; then ``A = [A_0; …; A_{E-1}]`` ``(E·r, in)`` and
``B[:, k·E + e] = B_e[:, k]`` ``(out, r·E)``.
"""

from __future__ import annotations

from typing import Any

import torch

from driftmerge.core.factorizer import GroupFactorizer
from driftmerge.core.lowrank import Factor
from driftmerge.core.sums import sq_norm
from driftmerge.io.adapter import Extra, LoraModule, LowRankExtra
from driftmerge.io.targets import Target
from driftmerge.schema import TensorRecord

FACTOR_EXTRAS_MIN = 1 << 14  # an extras drift of at least this many elements (and 2+ dims) is stored factored


def placement(target: Target) -> dict[str, Any]:
    """The :class:`TensorRecord` fields that say where PEFT carries a tensor."""
    facts: dict[str, Any] = {"module": target.path}
    if target.kind in ("param", "experts"):
        facts["nest"] = target.nest
    if target.kind == "experts":
        facts["experts"] = target.experts
        if target.expert is not None:
            facts["expert"] = target.expert
            facts["rows"] = list(target.rows) if target.rows else None
        else:
            facts["transposed"] = target.transposed
    return facts


class ExpertQueue:
    """Sends expert matrices to the factorizer as ``path[e]``, gathering per-expert pieces first."""

    def __init__(self, factorizer: GroupFactorizer) -> None:
        self.factorizer = factorizer
        self.pending: dict[str, tuple[Target, dict[tuple[int, int], torch.Tensor]]] = {}
        self.sq: dict[str, float] = {}  # "path[e]" -> ‖D_e‖² of a stored stack's slice

    def add(self, drift: torch.Tensor, target: Target) -> None:
        """Queue a stored stack's experts, or one piece of an expert's matrix (sent when its rows are complete)."""
        if target.expert is None:  # a stored (E, ·, ·) stack: one matrix per expert
            for e in range(drift.shape[0]):
                part = drift[e].contiguous()  # (out, in), or (in, out) for a transposed stack
                sq = self.sq[f"{target.path}[{e}]"] = sq_norm(part)
                self.factorizer.add(f"{target.path}[{e}]", part, transposed=target.transposed, sq_norm=sq)
            return
        key = f"{target.path}[{target.expert}]"
        _, parts = self.pending.setdefault(key, (target, {}))
        parts[target.rows or (0, drift.shape[0])] = drift
        assert target.dims is not None  # an experts target knows its (out, in)
        if sum(stop - start for start, stop in parts) == target.dims[0]:
            self._send(key)

    def finish(self) -> None:
        """Send the matrices still missing a piece (its rows are zero)."""
        for key in list(self.pending):
            self._send(key)

    def _send(self, key: str) -> None:
        target, parts = self.pending.pop(key)
        assert target.dims is not None
        first = next(iter(parts.values()))
        matrix = torch.zeros(target.dims, dtype=first.dtype, device=first.device)  # (out, in)
        for (start, stop), d in parts.items():
            matrix[start:stop] = d
        self.factorizer.add(key, matrix)


def group_of(name: str, target: Target | None) -> str:
    """The unit that must stay on one rank under torchrun: an expert's matrix for its pieces, else the tensor."""
    if target is not None and target.kind == "experts" and target.expert is not None:
        return f"{target.path}[{target.expert}]"
    return name


def factor_extra(name: str, drift: torch.Tensor) -> bool:
    """Is this extras drift large enough to store as factors (a matrix view of 2+ dims, both sides > 1)? Biases
    never are: a stack of per-expert biases ``(E, out)`` holds E independent vectors, which one rank-r factor pair
    would force into a shared r-dimensional subspace."""
    if name.endswith("bias") or drift.dim() < 2 or drift.numel() < FACTOR_EXTRAS_MIN:
        return False
    return min(drift.shape[-1], drift.numel() // drift.shape[-1]) > 1


def assemble(
    factors: dict[str, Factor],
    records: dict[str, TensorRecord],
    *,
    targets: dict[str, Target],
    slice_sq: dict[str, float],
    extras: dict[str, torch.Tensor],
) -> tuple[dict[str, LoraModule], dict[str, Extra]]:
    """PEFT targets and extras from the factors; ``records`` get their rank and kept energy (or ``stored="zero"``
    when the factor came out rank 0: a drift below round-off).

    A piece of an expert's matrix keeps ``‖B_e[rows] A_e‖² / ‖D_piece‖²`` of its drift; a stored stack
    ``Σ_e energy_e ‖D_e‖² / Σ_e ‖D_e‖²``.
    """
    modules: dict[str, LoraModule] = {}
    out_extras: dict[str, Extra] = {}
    for name, rec in records.items():
        target = targets.get(name)
        if rec.stored == "extras":
            if name in extras:
                out_extras[name] = extras[name]
            elif name in factors:
                f = factors[name]
                rec.rank, rec.energy = f.rank, f.energy
                out_extras[name] = LowRankExtra(f.A, f.B, tuple(rec.shape))
            continue
        if target is not None and target.path not in modules:
            module = _module(name, rec, target, factors)
            if module is not None:
                modules[target.path] = module
        if rec.stored == "lora":
            assert target is not None  # a lora record has its target
            rec.rank, rec.energy = _kept(name, rec, target, factors, slice_sq)
            if not rec.rank:
                rec.stored, rec.rank, rec.energy = "zero", None, None  # module kept, as written since version 1
    return modules, out_extras


def _module(name: str, rec: TensorRecord, target: Target, factors: dict[str, Factor]) -> LoraModule | None:
    """The PEFT target ``target`` from the factors: a whole expert stack (once, whichever piece comes first), or
    one tensor's LoRA factors (None for a rank-0 factor or a tensor without drift)."""
    if target.kind == "experts":
        return _stack(target, factors)
    f = factors.get(name)
    if rec.stored != "lora" or f is None or f.rank == 0:
        return None
    return LoraModule(target.path, target.kind, f.A, f.B, nest=target.nest)


def _kept(
    name: str, rec: TensorRecord, target: Target, factors: dict[str, Factor], slice_sq: dict[str, float]
) -> tuple[int, float]:
    """The rank and kept energy share of one tensor's stored drift."""
    if target.kind != "experts":
        return factors[name].rank, factors[name].energy
    if target.expert is not None:
        f = factors[f"{target.path}[{target.expert}]"]
        start, stop = target.rows or (0, f.B.shape[0])
        kept = float((f.B[start:stop].float() @ f.A.float()).pow(2).sum())  # ‖B_e[rows] A_e‖²
        return f.rank, min(kept / rec.drift_norm**2, 1.0) if rec.drift_norm > 0 else 1.0
    keys = [f"{target.path}[{e}]" for e in range(target.experts)]
    total = sum(slice_sq[k] for k in keys)
    kept = sum(factors[k].energy * slice_sq[k] for k in keys)
    return max(factors[k].rank for k in keys), kept / total if total > 0 else 1.0


def _stack(target: Target, factors: dict[str, Factor]) -> LoraModule | None:
    """PEFT's ``(E·r, in)`` / ``(out, r·E)`` factors of a stack from its experts' factors (module docstring)."""
    assert target.dims is not None  # an experts target knows its (out, in)
    (out, inn), n = target.dims, target.experts
    per = [factors.get(f"{target.path}[{e}]") for e in range(n)]
    r = max((f.rank for f in per if f is not None), default=0)
    if r == 0:
        return None
    dtype = next(f for f in per if f is not None).A.dtype
    a = torch.zeros(n, r, inn, dtype=dtype)  # (E, r, in)
    b = torch.zeros(out, r, n, dtype=dtype)  # (out, r, E)
    for e, f in enumerate(per):
        if f is not None and f.rank:
            a[e, : f.rank] = f.A
            b[:, : f.rank, e] = f.B
    return LoraModule(target.path, "experts", a.reshape(n * r, inn), b.reshape(out, r * n), experts=n, nest=target.nest)
