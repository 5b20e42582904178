"""The `analyze` report: ``report.json`` (schema: ``docs/report.schema.json``), ``report.md``, the console summary,
and what each R² means (the figures: :mod:`driftmerge.reports.linearity_figures`).

Figures are drawn with matplotlib (the ``[plot]`` extra) on the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from driftmerge.core.linearity import (
    R2_THRESHOLD,
    SMALL_SAMPLE,
    TensorStats,
    base_line,
    free_line,
    group_by,
    model_projection,
    summarize,
)
from driftmerge.errors import DriftmergeError

REPORT_FORMAT = "driftmerge-analysis"
REPORT_VERSION = 1
FIGURES = {
    "r2_heatmap": "r2_heatmap.png",
    "element_r2_hist": "element_r2_hist.png",
    "rank1_energy_heatmap": "rank1_energy_heatmap.png",
    "drift_norm_vs_step": "drift_norm_vs_step.png",
    "trajectory_projection": "trajectory_projection.png",
    "logprob_r2_hist": "logprob_r2_hist.png",
}


def build_report(
    stats: list[TensorStats],
    steps: list[int],
    *,
    base_step: int,
    refs: dict[str, Any],
    settings: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report holds, as plain JSON-able data."""
    by_type = group_by(stats, lambda s: s.module_type)
    by_layer = group_by(stats, lambda s: "other" if s.layer is None else str(s.layer))
    t = [s - base_step for s in steps]
    proj = model_projection(stats)
    along = len(proj) == len(t)  # checkpoints measured (an adapter records no trajectory)
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "source": refs.get("source", "checkpoints"),
        "base": refs.get("base"),
        "checkpoints": [{"ref": r, "step": s} for r, s in zip(refs.get("checkpoints", []), steps, strict=False)],
        "steps": steps,
        "base_step": base_step,
        "settings": {**settings, "r2_threshold": R2_THRESHOLD},
        "model": {
            **summarize(stats),
            "projection": proj,
            "projection_line": free_line([0.0, *t], [0.0, *proj]) if along else None,
            "projection_base_line": base_line(t, proj) if along else None,
        },
        "by_module_type": {k: summarize(v) for k, v in sorted(by_type.items())},
        "by_layer": {k: summarize(v) for k, v in sorted(by_layer.items(), key=lambda kv: _layer_key(kv[0]))},
        "tensors": {s.name: _tensor_entry(s) for s in stats},
        "logprobs": logprobs,
    }
    report["notes"] = notes(report)
    return report


def _layer_key(k: str) -> tuple[int, int]:
    return (1, 0) if k == "other" else (0, int(k))


def _tensor_entry(s: TensorStats) -> dict[str, Any]:
    elems = s.elem_r2
    return {
        "module_type": s.module_type,
        "layer": s.layer,
        "shape": s.shape,
        "r2": s.r2,
        "elem_r2_median": statistics.median(elems) if elems else None,
        "elem_r2_share_above": sum(r > R2_THRESHOLD for r in elems) / len(elems) if elems else None,
        "elem_sampled": s.elem_sampled,
        "elem_kept": len(elems),
        "delta_norms": s.delta_norms,
        "drift_norm": s.drift_norm,
        "step_cosines": s.step_cosines,
        "projection": s.projection,
        "energy_top": {str(k): v for k, v in s.energy_top.items()} if s.energy_top else None,
    }


# ---- what the numbers mean ---------------------------------------------------------------------------------------
SHORT_NEEDS_TWO = "no R² from one checkpoint (see the note above)"
NEEDS_TWO = (
    "R² needs two or more checkpoints (plus the base): a line fits the base and one checkpoint exactly, so no R² is"
    " reported; drift norms and rank-1 energy are."
)


def has_r2(report: dict[str, Any]) -> bool:
    return len(report["steps"]) >= 2


def _small(g: dict[str, Any]) -> bool:
    """A per-element figure drawn from fewer than SMALL_SAMPLE elements of larger tensors (all of a small tensor is
    no sample)."""
    kept = g.get("elem_count", g.get("elem_kept", 0))
    numel = g.get("elem_numel", math.prod(g.get("shape", [])))
    return 0 < g["elem_sampled"] < numel and 0 < kept < SMALL_SAMPLE


def _groups(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [report["model"], *report["by_module_type"].values(), *report["by_layer"].values()]


def notes(report: dict[str, Any]) -> list[str]:
    """Warnings and caveats, said once each in the console summary and in report.md."""
    out = []
    if not has_r2(report):
        out.append(NEEDS_TWO)
    if report["source"] == "adapter":
        out.append(
            "From an adapter alone: the per-element R², the drift norm per checkpoint, the direction stability and"
            " the trajectory need the checkpoints (run `driftmerge analyze BASE CHECKPOINT...`)."
        )
    small = [g["elem_count"] for g in _groups(report) if _small(g)]
    small += [e["elem_kept"] for e in report["tensors"].values() if _small(e)]
    if small:
        err = 50 / math.sqrt(max(min(small), 1))
        out.append(
            f"Warning: per-element R² marked * rests on fewer than {SMALL_SAMPLE} sampled elements (as few as"
            f" {min(small)}): its median and share are uncertain by about ±{err:.0f} points (one standard error)."
            " Raise --sample-frac or --min-sample."
        )
    return out


def legend(report: dict[str, Any]) -> list[str]:
    """One line per R² the summary table shows: what it is, and how it relates to the number `extract` prints."""
    m, st = report["model"], report["settings"]
    out = []
    if has_r2(report):
        how = (
            "each tensor's as extract recorded it, a group's the drift-energy-weighted mean"
            if report["source"] == "adapter"
            else "pooled over every element of the group, large moves weighing more"
        )
        out.append(
            "R² pooled: the share of the weights' movement that a straight line in the step explains (each element's"
            f" least-squares line with intercept, over the base and the checkpoints), {how}. extract records it per"
            f" tensor and prints the median over tensors: here {fmt(m['r2_tensor_median'])}."
        )
    if m["elem_count"]:
        out.append(
            f"elem R²: the same r² for single elements, on a seeded sample ({m['elem_sampled']:,} of"
            f" {m['elem_numel']:,} elements: {st['sample_frac']:g} of each tensor, at least {st['min_sample']:,} or all"
            f" of a smaller one); median and share above {R2_THRESHOLD} of the {m['elem_count']:,} that move"
            " ('elements'), each counting alike: small, noisy elements usually pull it below the pooled R²."
        )
    return out


def projection_text(report: dict[str, Any]) -> str | None:
    """What the trajectory figure's fit means (None when there is no such fit)."""
    line = report["model"]["projection_line"]
    if not line:
        return None
    return (
        "projection r² (trajectory figure): the base's and checkpoints' projections on the whole model's drift"
        " direction against the step, fitted by a free line with intercept: r² "
        f"{line['r2']:.3f}. It sees linearity along that one direction only, not the movement off it that the"
        " pooled R² counts, so it usually reads highest. The figure's solid line is the one extract extrapolates along:"
        " through the base, slope ‖D‖ / t_ref."
    )


# ---- markdown and terminal ---------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _cols(report: dict[str, Any]) -> tuple[bool, bool]:
    return has_r2(report), bool(report["model"]["elem_count"])


def _elem_cells(g: dict[str, Any], median_only: bool = False) -> list[str]:
    share = g["elem_r2_share_above"]
    kept = g.get("elem_count", g.get("elem_kept", 0))
    cells = [fmt(g["elem_r2_median"])]
    if not median_only:
        cells.append("n/a" if share is None else f"{100 * share:.0f} %")
    return [*cells, f"{kept:,}" + (" *" if _small(g) else "")]


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the compact table: the whole model, then each module type (R² columns only where measured)."""
    r2, elem = _cols(report)
    head = ["group", "tensors", *(["R² pooled"] if r2 else [])]
    head += [*(["elem R² median", f"elem R² > {R2_THRESHOLD}", "elements"] if elem else []), "rank-1 energy"]
    rows = [head]
    for label, g in [("model", report["model"]), *report["by_module_type"].items()]:
        cells = [label, str(g["tensors"]), *([fmt(g["r2"])] if r2 else []), *(_elem_cells(g) if elem else [])]
        rows.append([*cells, fmt(g["energy_rank1"])])
    return rows


def _intro(report: dict[str, Any]) -> str:
    steps = ", ".join(map(str, report["steps"]))
    n = len(report["steps"])
    cks = f"{n} checkpoint{'s' if n > 1 else ''} at step{'s' if n > 1 else ''} {steps}"
    base = f"the base {report['base']} (step {report['base_step']})"
    if report["source"] == "adapter":
        return f"Rendered from an adapter's driftmerge.json: extract's fit from {base} and {cks}."
    return f"{base[0].upper()}{base[1:]}; {cks}."


def markdown(report: dict[str, Any], figures: dict[str, str], *, skipped: dict[str, str] | None = None) -> str:
    r2, elem = _cols(report)
    lines = [
        "# driftmerge analysis",
        "",
        _intro(report) + f' "Linear" means R² > {R2_THRESHOLD} (the seed paper\'s bar).',
    ]
    lines += [line for n in report["notes"] for line in ("", f"> {n}")]
    lines += ["", "## Summary", "", *md_table(summary_rows(report))]
    meaning = [*legend(report), *([p] if (p := projection_text(report)) else [])]
    if meaning:
        lines += ["", "## What the R² figures mean", ""]
        lines += [f"- **{name}**{rest}" for name, rest in (_split_name(x) for x in meaning)]
    per_layer = [
        ["layer", "tensors", *(["R² pooled"] if r2 else []), *(["elem R² median", "elements"] if elem else [])]
    ]
    per_layer[0].append("rank-1 energy")
    for k, g in report["by_layer"].items():
        cells = [k, str(g["tensors"]), *([fmt(g["r2"])] if r2 else []), *(_elem_cells(g, True) if elem else [])]
        per_layer.append([*cells, fmt(g["energy_rank1"])])
    lines += ["", "## Per layer", "", *md_table(per_layer)]
    if r2:
        least = sorted(
            ((n, e) for n, e in report["tensors"].items() if e["r2"] is not None), key=lambda ne: ne[1]["r2"]
        )
        cos = report["source"] == "checkpoints"
        rows = [["tensor", "R² pooled", *(["elem R² median", "elements"] if elem else []), *(["min step cos"] * cos)]]
        rows += [
            [n, fmt(e["r2"]), *(_elem_cells(e, True) if elem else []), *([fmt(min(e["step_cosines"]))] if cos else [])]
            for n, e in least[:10]
        ]
        lines += ["", "## Least linear tensors", "", *md_table(rows)]
    lp = report.get("logprobs")
    if lp:
        lines += [
            "",
            "## Teacher-forced log-prob linearity",
            "",
            f"{lp['pairs']} pairs, {lp['tokens']} response tokens; {lp['kept']} moved by more than "
            f"{lp['min_move']} and are kept: median R² {fmt(lp['r2_median'])}, "
            f"{fmt(None if lp['r2_share_above'] is None else 100 * lp['r2_share_above'], 0)} % above {R2_THRESHOLD}.",
        ]
    if figures or skipped:
        lines += ["", "## Figures", "", *(f"![{k}]({v})" for k, v in figures.items())]
        lines += [f"- not drawn: {k}: {why}" for k, why in (skipped or {}).items()]
    return "\n".join(lines) + "\n"


def _split_name(text: str) -> tuple[str, str]:
    """("R² pooled", ": the share …") from "R² pooled: the share …" (a parenthesis after the name stays outside)."""
    head, sep, rest = text.partition(":")
    name, paren, note = head.partition(" (")
    return name, f" ({note}" * bool(paren) + sep + rest


def md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(r) + " |" for r in rows[1:]]


# ---- figures -----------------------------------------------------------------------------------------------------
def pyplot(command: str = "analyze") -> Any:
    """matplotlib's pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DriftmergeError(
            f"{command} draws its figures with matplotlib, which is not installed: pip install 'driftmerge[plot]'"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Fail before the long pass when the figures could not be drawn."""
    pyplot()


def plotting_available() -> bool:
    """Whether :func:`pyplot` can draw (matplotlib, the plot extra, is installed)."""
    try:
        check_plotting()
    except DriftmergeError:
        return False
    return True


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
