"""The `analyze` report: ``report.json`` (schema: ``docs/report.schema.json``), ``report.md`` and PNG figures.

Figures are drawn with matplotlib (the ``[plot]`` extra) on the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from driftmerge.core.linearity import R2_THRESHOLD, TensorStats, group_by, model_projection, summarize
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
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "source": refs.get("source", "checkpoints"),
        "base": refs.get("base"),
        "checkpoints": [{"ref": r, "step": s} for r, s in zip(refs.get("checkpoints", []), steps, strict=False)],
        "steps": steps,
        "base_step": base_step,
        "settings": {**settings, "r2_threshold": R2_THRESHOLD},
        "model": {**summarize(stats), "projection": proj, "projection_line": _line([0.0, *t], [0.0, *proj])},
        "by_module_type": {k: summarize(v) for k, v in sorted(by_type.items())},
        "by_layer": {k: summarize(v) for k, v in sorted(by_layer.items(), key=lambda kv: _layer_key(kv[0]))},
        "tensors": {s.name: _tensor_entry(s) for s in stats},
        "logprobs": logprobs,
    }


def _layer_key(k: str) -> tuple[int, int]:
    return (1, 0) if k == "other" else (0, int(k))


def _line(x: list[float], y: list[float]) -> dict[str, float] | None:
    """Least-squares ``y = slope x + intercept`` and its R² (None with fewer than 3 points)."""
    if len(x) < 3:
        return None
    n = len(x)
    xb, yb = sum(x) / n, sum(y) / n
    sxx = sum((a - xb) ** 2 for a in x)
    sxy = sum((a - xb) * (b - yb) for a, b in zip(x, y, strict=True))
    syy = sum((b - yb) ** 2 for b in y)
    slope = sxy / sxx if sxx > 0 else 0.0
    return {"slope": slope, "intercept": yb - slope * xb, "r2": sxy * sxy / (sxx * syy) if sxx * syy > 0 else 1.0}


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


# ---- markdown and terminal ---------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the compact table: the whole model, then each module type."""
    head = ["group", "tensors", "R² pooled", "elem R² median", f"elem R² > {R2_THRESHOLD}", "rank-1 energy"]
    rows = [head]
    for label, g in [("model", report["model"]), *report["by_module_type"].items()]:
        share = g["elem_r2_share_above"]
        rows.append(
            [
                label,
                str(g["tensors"]),
                _fmt(g["r2"]),
                _fmt(g["elem_r2_median"]),
                "n/a" if share is None else f"{100 * share:.0f} %",
                _fmt(g["energy_rank1"]),
            ]
        )
    return rows


def markdown(report: dict[str, Any], figures: dict[str, str]) -> str:
    steps = ", ".join(map(str, report["steps"]))
    lines = [
        "# driftmerge analysis",
        "",
        f"Base {report['base']} (step {report['base_step']}); checkpoints at steps {steps}. "
        f"Per-element R² on a {report['settings'].get('sample_frac')} sample of each tensor's elements; "
        f'"linear" means R² > {R2_THRESHOLD} (the seed paper\'s bar).',
        "",
        "## Summary",
        "",
        *md_table(summary_rows(report)),
        "",
        "## Per layer",
        "",
        *md_table(
            [["layer", "tensors", "R² pooled", "elem R² median", "rank-1 energy"]]
            + [
                [k, str(g["tensors"]), _fmt(g["r2"]), _fmt(g["elem_r2_median"]), _fmt(g["energy_rank1"])]
                for k, g in report["by_layer"].items()
            ]
        ),
        "",
        "## Least linear tensors",
        "",
        *md_table(
            [["tensor", "R² pooled", "elem R² median", "min step cos"]]
            + [
                [name, _fmt(e["r2"]), _fmt(e["elem_r2_median"]), _fmt(min(e["step_cosines"], default=None))]
                for name, e in sorted(
                    ((n, e) for n, e in report["tensors"].items() if e["r2"] is not None), key=lambda ne: ne[1]["r2"]
                )[:10]
            ]
        ),
    ]
    lp = report.get("logprobs")
    if lp:
        lines += [
            "",
            "## Teacher-forced log-prob linearity",
            "",
            f"{lp['pairs']} pairs, {lp['tokens']} response tokens; {lp['kept']} moved by more than "
            f"{lp['min_move']} and are kept: median R² {_fmt(lp['r2_median'])}, "
            f"{_fmt(None if lp['r2_share_above'] is None else 100 * lp['r2_share_above'], 0)} % above {R2_THRESHOLD}.",
        ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()]
    return "\n".join(lines) + "\n"


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


def draw_figures(report: dict[str, Any], stats: list[TensorStats], *, out: Path) -> dict[str, str]:
    """Write the PNG figures into ``out``; return {figure: file name}."""
    plt = pyplot()
    written: dict[str, str] = {}
    layers = [k for k in report["by_layer"] if k != "other"]
    types = sorted({s.module_type for s in stats if s.layer is not None})

    def grid(value: str, cols: list[str]) -> list[list[float]]:
        cells = {(str(s.layer), s.module_type): s for s in stats if s.layer is not None}
        out_rows = []
        for layer in layers:
            row = []
            for typ in cols:
                s = cells.get((layer, typ))
                v = None
                if s is not None:
                    v = s.r2 if value == "r2" else (s.energy_top or {}).get(1)
                row.append(math.nan if v is None else v)
            out_rows.append(row)
        return out_rows

    for key, value, title in (
        ("r2_heatmap", "r2", "Pooled linearity R² per tensor"),
        ("rank1_energy_heatmap", "energy", "Share of drift energy in rank 1"),
    ):
        cols = types if value == "r2" else [c for c in types if any(s.module_type == c and s.energy_top for s in stats)]
        if not layers or not cols:  # no layer stack, or no 2-D weights for the energy map
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.7 * len(cols)), max(3.5, 1.6 + 0.3 * len(layers))))
        im = ax.imshow(grid(value, cols), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
        _save(fig, out / FIGURES[key], plt)
        written[key] = FIGURES[key]

    elems = [r for s in stats for r in s.elem_r2]
    if elems:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(elems, bins=50, range=(0, 1), color="tab:blue")
        ax.axvline(R2_THRESHOLD, color="tab:red", linestyle="--", label=f"R² = {R2_THRESHOLD}")
        ax.set_xlabel("per-element R² (sampled, moving elements)")
        ax.set_ylabel("elements")
        ax.set_title(f"Per-element linearity: median {_fmt(report['model']['elem_r2_median'])}")
        ax.legend()
        _save(fig, out / FIGURES["element_r2_hist"], plt)
        written["element_r2_hist"] = FIGURES["element_r2_hist"]

    if report["source"] == "adapter":  # one recorded point per tensor: no trajectory to draw
        return written
    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.get_cmap("tab20").colors
    for k, (typ, g) in enumerate(report["by_module_type"].items()):
        xs = [report["base_step"], *steps]
        ax.plot(xs, [0.0, *g["delta_norms"]], marker="o", label=typ, color=colors[k % len(colors)])
    ax.set_xlabel("step")
    ax.set_ylabel("‖W_step − W_base‖ (all tensors of the type)")
    ax.set_title("Drift norm vs step")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out / FIGURES["drift_norm_vs_step"], plt)
    written["drift_norm_vs_step"] = FIGURES["drift_norm_vs_step"]

    proj, line = report["model"]["projection"], report["model"]["projection_line"]
    if proj:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [report["base_step"], *steps]
        ax.plot(xs, [0.0, *proj], "o", color="tab:blue", label="base and checkpoints")
        if line:
            ts = [x - report["base_step"] for x in (xs[0], xs[-1])]
            ax.plot(
                [xs[0], xs[-1]],
                [line["intercept"] + line["slope"] * x for x in ts],
                "-",
                color="tab:orange",
                label=f"least-squares line (R² {line['r2']:.4f})",
            )
        ax.set_xlabel("step")
        ax.set_ylabel("projection on the fitted drift direction")
        ax.set_title("The trajectory along its drift")
        ax.legend()
        _save(fig, out / FIGURES["trajectory_projection"], plt)
        written["trajectory_projection"] = FIGURES["trajectory_projection"]

    lp = report.get("logprobs")
    if lp and lp.get("r2_values"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(lp["r2_values"], bins=40, range=(0, 1), color="tab:green")
        ax.axvline(R2_THRESHOLD, color="tab:red", linestyle="--")
        ax.set_xlabel(f"per-token log-prob R² (tokens that moved > {lp['min_move']})")
        ax.set_ylabel("tokens")
        ax.set_title(f"Log-prob linearity: median {_fmt(lp['r2_median'])}")
        _save(fig, out / FIGURES["logprob_r2_hist"], plt)
        written["logprob_r2_hist"] = FIGURES["logprob_r2_hist"]
    return written


def _save(fig: Any, path: Path, plt: Any) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    plt.close(fig)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
