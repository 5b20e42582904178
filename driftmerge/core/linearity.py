"""How linear was this run, and how much does rank 1 hold: per-tensor trajectory statistics (pure math, no I/O).

Notation as in :mod:`driftmerge.core.trajectory`: deltas ``D_i = W_i - W_0`` at relative steps ``t_i``; the points of a
fit are the base ``(0, 0)`` and the checkpoints (n = N + 1). All whole-tensor numbers come from the Gram matrix
``G_ij = ⟨D_i, D_j⟩`` (float64 sums of chunked float32 dots):

- drift norm per checkpoint ``‖D_i‖ = √G_ii``; direction stability ``cos(D_i, D_{i+1}) = G_{i,i+1} / (‖D_i‖‖D_{i+1}‖)``;
- pooled linearity R² (docs/design.md §2.3): ``SS_tot = tr G - 1ᵀG1 / n``, ``‖S_ty‖² = tᵀGt - 2 t̄ tᵀG1 + t̄² 1ᵀG1``,
  ``R² = 1 - (SS_tot - ‖S_ty‖² / S_tt) / SS_tot``;
- the lsq drift ``D = α Σ t_j D_j`` (``α = t_ref / Σ t²``) and each checkpoint's projection on its direction,
  ``c_i = ⟨D_i, D⟩ / ‖D‖ = α (G t)_i / ‖D‖``;
- per-element R² (the seed paper's measure) on a seeded sample of ``sample_frac`` of the elements, at least
  ``min_sample`` of them (every element of a smaller tensor): Pearson r² of the element's value against the step over
  the n points; elements whose range over the trajectory is below ``min_move`` × the median range of the sample barely
  move and are left out;
- for 2-D weights, the share of ``‖D‖_F²`` held by the top 1, 2, 4, … ``spectrum`` singular values;
- the whole model's trajectory along its drift direction: the lsq line through the base ``c(t) = slope · t`` with
  ``slope = Σ t_i c_i / Σ t_i² = ‖D‖ / t_ref`` (the line ``extract`` extrapolates along), and the free least-squares
  line with intercept through the base and the ``(t_i, c_i)``, whose Pearson r² is the "projection r²".
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from driftmerge.core.lowrank import matrix_seed, randomized_svd
from driftmerge.core.sums import dot, sq_norm
from driftmerge.core.trajectory import pooled_r2, pooled_sums

R2_THRESHOLD = 0.7  # the seed paper's bar for "linear"
MIN_SAMPLE = 1000  # per-element R²: at least this many elements of each tensor (all of a smaller one)
SMALL_SAMPLE = 200  # a per-element median or share from fewer sampled elements is flagged (±3.5 points at 200)
_PERM_MAX = 1 << 16  # tensors up to this size are sampled without replacement (a permutation costs ~10 ms here)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class TensorStats:
    name: str
    module_type: str  # q_proj, k_proj, ..., embed_tokens, input_layernorm, lm_head (bias tensors: "<type>.bias")
    layer: int | None
    shape: list[int]
    delta_norms: list[float]  # ‖D_i‖ per checkpoint
    step_cosines: list[float]  # cos(D_i, D_{i+1}), N - 1 values
    projection: list[float]  # ⟨D_i, D̂⟩ per checkpoint
    drift_norm: float  # ‖D‖ of the lsq drift
    ss_tot: float  # pooled Σ_e SS_tot,e (for pooling R² over groups)
    ss_res: float
    elem_r2: list[float] = field(default_factory=list)  # per-element R² of the kept sampled elements
    elem_sampled: int = 0  # elements sampled (drawn) for per-element R²; 0 with one checkpoint
    energy_top: dict[int, float] | None = None  # rank r -> share of ‖D‖² in the top r singular values

    @property
    def r2(self) -> float | None:
        return pooled_r2(self.ss_tot, self.ss_res)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def module_type(name: str) -> str:
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2] if parts[-1] == "weight" else f"{parts[-2]}.bias"
    return parts[-1]


def layer_of(name: str) -> int | None:
    m = _LAYER.search(f".{name}")
    return int(m.group(1)) if m else None


def tensor_stats(
    name: str,
    deltas: Sequence[torch.Tensor],
    *,
    t: Sequence[float],
    sample_frac: float = 1e-3,
    spectrum: int = 8,
    min_move: float = 0.1,
    seed: int = 0,
    min_sample: int = MIN_SAMPLE,
) -> TensorStats:
    """Statistics of one tensor from its deltas ``D_1..D_N`` (float32, any device, the tensor's shape)."""
    n_ck = len(deltas)
    if n_ck != len(t) or n_ck == 0:
        raise ValueError(f"got {n_ck} deltas for {len(t)} steps")
    flat = [d.reshape(-1) for d in deltas]
    gram = torch.zeros(n_ck, n_ck, dtype=torch.float64)  # (N, N) G_ij = ⟨D_i, D_j⟩
    for i in range(n_ck):
        for j in range(i + 1):
            gram[i, j] = gram[j, i] = dot(flat[i], flat[j])
    tt = torch.tensor([float(x) for x in t], dtype=torch.float64)  # (N,)
    ones = torch.ones(n_ck, dtype=torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = [
        max(-1.0, min(1.0, float(gram[i, i + 1] / (norms[i] * norms[i + 1])))) if norms[i] * norms[i + 1] > 0 else 0.0
        for i in range(n_ck - 1)
    ]
    alpha = float(tt[-1]) / float(tt @ tt)
    drift_sq = alpha * alpha * float(tt @ gram @ tt)
    drift_norm = math.sqrt(max(drift_sq, 0.0))
    gt = gram @ tt  # (N,) ⟨D_i, Σ_j t_j D_j⟩
    projection = [float(alpha * x / drift_norm) if drift_norm > 0 else 0.0 for x in gt]
    ss_tot, ss_res = pooled_sums(
        t,
        sum_sq_norms=float(gram.trace()),
        sq_norm_sum=float(ones @ gram @ ones),
        sq_norm_tsum=float(tt @ gt),
        dot_tsum_sum=float(gt.sum()),
    )

    stats = TensorStats(
        name=name,
        module_type=module_type(name),
        layer=layer_of(name),
        shape=list(deltas[0].shape),
        delta_norms=norms.tolist(),
        step_cosines=cos,
        projection=projection,
        drift_norm=drift_norm,
        ss_tot=ss_tot,
        ss_res=ss_res,
    )
    gen_seed = matrix_seed(seed, name)
    if n_ck >= 2:
        stats.elem_r2, stats.elem_sampled = element_r2(
            flat, t, frac=sample_frac, min_move=min_move, seed=gen_seed, min_count=min_sample
        )
    if deltas[0].dim() == 2 and drift_norm > 0 and spectrum > 0:
        drift = torch.zeros_like(deltas[0])  # (m, n) the lsq drift
        for d, tj in zip(deltas, t, strict=True):
            drift.add_(d, alpha=alpha * float(tj))
        stats.energy_top = energy_spectrum(drift, spectrum, seed=gen_seed)
    return stats


def sample_indices(numel: int, count: int, *, seed: int) -> torch.Tensor:
    """``count`` seeded element indices of a tensor of ``numel``: all of them (in order) when ``count ≥ numel``;
    without replacement when the tensor is small (≤ 2^16 elements) or the sample is an eighth of it or more; else
    with replacement (a repeat is then rare: about ``count / (2 numel)`` of the draws, 0.05 % at 1e-3)."""
    if count >= numel:
        return torch.arange(numel)
    gen = torch.Generator().manual_seed(seed)
    if numel <= _PERM_MAX or 8 * count >= numel:
        return torch.randperm(numel, generator=gen)[:count]
    return torch.randint(numel, (count,), generator=gen)


def element_r2(
    flat: Sequence[torch.Tensor],
    t: Sequence[float],
    *,
    frac: float,
    min_move: float,
    seed: int,
    min_count: int = MIN_SAMPLE,
) -> tuple[list[float], int]:
    """Per-element R² on a seeded sample of ``max(min_count, frac · numel)`` elements (all of a smaller tensor);
    returns (R² of the sampled elements that move, number sampled)."""
    numel = flat[0].numel()
    count = min(numel, max(min_count, 1, round(frac * numel)))
    idx = sample_indices(numel, count, seed=seed).to(flat[0].device)  # (S,)
    y = torch.stack([torch.zeros(count, device=flat[0].device), *(f[idx] for f in flat)]).double().cpu()  # (n, S)
    ts = torch.tensor([0.0, *map(float, t)], dtype=torch.float64)[:, None]  # (n, 1)
    yc, tc = y - y.mean(0), ts - ts.mean()
    ss_tot = (yc * yc).sum(0)  # (S,)
    s_ty = (tc * yc).sum(0)
    spread = y.amax(0) - y.amin(0)  # (S,) range over the trajectory
    moving = spread > 0
    if bool(moving.any()):
        moving &= spread >= min_move * float(spread[moving].median())
    r2 = (s_ty * s_ty) / (float((tc * tc).sum()) * ss_tot.clamp_min(1e-300))
    return r2[moving].clamp(0.0, 1.0).tolist(), count


def energy_spectrum(matrix: torch.Tensor, k: int, *, seed: int) -> dict[int, float]:
    """Share of ``‖M‖_F²`` in the top r singular values, for r = 1, 2, 4, … up to ``k`` (and ``k`` itself)."""
    m, n = matrix.shape
    k = min(k, m, n)
    total = sq_norm(matrix)
    if k + 8 >= min(m, n):
        sv = torch.linalg.svdvals(matrix.float())[:k]
    else:
        _, sv, _, _ = randomized_svd(matrix[None].float(), k + 8, seeds=[seed], track=k)
        sv = sv[0, :k]
    cum = torch.cumsum(sv.double().pow(2), 0) / total  # (k,)
    ranks = sorted({*(2**i for i in range(k.bit_length()) if 2**i <= k), k})
    return {r: min(float(cum[r - 1]), 1.0) for r in ranks}


def summarize(group: Iterable[TensorStats]) -> dict[str, float | int | list[float] | None]:
    """Pooled numbers for a group of tensors: R² (pooled sums; also the median of the per-tensor R², the summary
    ``extract`` prints), element R² with its sample size, rank-1 energy, drift norms."""
    items = list(group)
    ss_tot = sum(s.ss_tot for s in items)
    ss_res = sum(s.ss_res for s in items)
    r2s = [r for s in items if (r := s.r2) is not None]
    elems = [r for s in items for r in s.elem_r2]
    mats = [(s.energy_top[1], s.drift_norm**2) for s in items if s.energy_top]  # (rank-1 share, ‖D‖²)
    weight = sum(w for _, w in mats)
    n_ck = len(items[0].delta_norms) if items else 0
    return {
        "tensors": len(items),
        "r2": pooled_r2(ss_tot, ss_res),
        "r2_tensor_median": statistics.median(r2s) if r2s else None,
        "elem_r2_median": statistics.median(elems) if elems else None,
        "elem_r2_share_above": sum(r > R2_THRESHOLD for r in elems) / len(elems) if elems else None,
        "elem_count": len(elems),
        "elem_sampled": sum(s.elem_sampled for s in items),
        "elem_numel": sum(s.numel for s in items if s.elem_sampled),
        "energy_rank1": sum(e * w for e, w in mats) / weight if weight > 0 else None,
        "delta_norms": [math.sqrt(sum(s.delta_norms[i] ** 2 for s in items)) for i in range(n_ck)],
    }


def group_by(stats: Iterable[TensorStats], key: Callable[[TensorStats], str]) -> dict[str, list[TensorStats]]:
    out: dict[str, list[TensorStats]] = {}
    for s in stats:
        out.setdefault(key(s), []).append(s)
    return out


def model_projection(stats: Sequence[TensorStats]) -> list[float]:
    """Each checkpoint's projection on the whole model's drift direction (all tensors' drifts, concatenated):
    ``c_i = Σ_T ⟨D_i^T, D^T⟩ / √(Σ_T ‖D^T‖²)``."""
    total = math.sqrt(sum(s.drift_norm**2 for s in stats))
    if not stats or total == 0:
        return []
    n_ck = len(stats[0].projection)
    return [sum(s.projection[i] * s.drift_norm for s in stats) / total for i in range(n_ck)]


def free_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """Least-squares ``y = slope x + intercept`` and its Pearson r² (None with fewer than 3 points)."""
    if len(x) < 3:
        return None
    n = len(x)
    xb, yb = sum(x) / n, sum(y) / n
    sxx = sum((a - xb) ** 2 for a in x)
    sxy = sum((a - xb) * (b - yb) for a, b in zip(x, y, strict=True))
    syy = sum((b - yb) ** 2 for b in y)
    slope = sxy / sxx if sxx > 0 else 0.0
    return {"slope": slope, "intercept": yb - slope * xb, "r2": sxy * sxy / (sxx * syy) if sxx * syy > 0 else 1.0}


def base_line(t: Sequence[float], c: Sequence[float]) -> dict[str, float] | None:
    """The least-squares line through the base ``(0, 0)``: ``c(t) = slope · t``, ``slope = Σ t_i c_i / Σ t_i²``. For
    the projections on the lsq drift direction this is ``‖D‖ / t_ref``: the line ``extract`` extrapolates along."""
    tt = sum(x * x for x in t)
    if not c or tt == 0:
        return None
    return {"slope": sum(x * y for x, y in zip(t, c, strict=True)) / tt, "intercept": 0.0}


@dataclass
class Heatmap:
    """A figure's data: the layer stack (rows: layers, columns: :func:`heatmap_column`; a cell pools the tensors it
    holds, as an MoE layer's experts) and, beside it, each tensor outside the stack (embeddings, final norm,
    lm_head)."""

    layers: list[str]
    types: list[str]  # columns: tensor paths inside a layer
    grid: list[list[float | None]]  # (layers, types)
    others: list[str]  # tensor names: embeddings first, then norms and the rest, heads last
    other_values: list[float | None]


def heatmap(stats: Sequence[TensorStats], value: str) -> Heatmap:
    """``value``: "r2" (pooled R², every tensor) or "energy" (rank-1 share of the drift energy, 2-D weights)."""
    keep = [s for s in stats if value == "r2" or s.energy_top]
    key = "r2" if value == "r2" else "energy_rank1"
    inside = group_by((s for s in keep if s.layer is not None), lambda s: f"{s.layer}\t{heatmap_column(s.name)}")
    layers = sorted({s.layer for s in keep if s.layer is not None})
    types = sorted({heatmap_column(s.name) for s in keep if s.layer is not None})
    grid = [[_value(inside.get(f"{layer}\t{typ}"), key) for typ in types] for layer in layers]
    others = sorted((s for s in keep if s.layer is None), key=lambda s: (_outside_rank(s.name), s.name))
    return Heatmap(
        layers=[str(x) for x in layers],
        types=types,
        grid=grid,
        others=[s.name for s in others],
        other_values=[_value([s], key) for s in others],
    )


def heatmap_column(name: str) -> str:
    """A layer tensor's column: its path inside the layer without indices or ``.weight`` (GPT-2's ``attn.c_proj``
    and ``mlp.c_proj`` apart, an MoE layer's experts together): ``model.layers.3.mlp.experts.7.up_proj.weight`` →
    ``mlp.experts.up_proj``."""
    m = _LAYER.search(f".{name}")
    parts = [p for p in (f".{name}"[m.end() :] if m else name).split(".") if not p.isdigit()]
    return ".".join(parts[:-1] if parts[-1:] == ["weight"] and len(parts) > 1 else parts)


def _value(group: list[TensorStats] | None, key: str) -> float | None:
    v = summarize(group)[key] if group else None
    return float(v) if isinstance(v, (int, float)) else None


def _outside_rank(name: str) -> int:
    low = name.lower()
    if any(k in low for k in ("embed", "wte", "wpe", "tok_emb")):
        return 0
    return 2 if any(k in low for k in ("lm_head", "head", "output.")) else 1
