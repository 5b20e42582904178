"""The `analyze` figures (PNG, matplotlib on the Agg backend): R² and rank-1 energy heatmaps of every tensor, the
per-element R² histogram, drift norm vs step, the trajectory along its drift direction, log-prob R².

Each figure's data comes from a pure function (:func:`driftmerge.core.linearity.heatmap`, :func:`trajectory_data`)
that the tests check; a figure with nothing to show is left out and the reason returned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from driftmerge.core.linearity import R2_THRESHOLD, SMALL_SAMPLE, Heatmap, TensorStats, heatmap
from driftmerge.reports.linearity import FIGURES, SHORT_NEEDS_TWO, fmt, has_r2, pyplot


def trajectory_data(report: dict[str, Any]) -> dict[str, Any] | None:
    """The trajectory figure's data: base and checkpoints' projections on the model's drift direction, and its lines
    evaluated at the base and the last step ("base": extract's line through the base; "free": with intercept)."""
    model, b = report["model"], report["base_step"]
    if not model["projection"]:
        return None
    ends = [b, report["steps"][-1]]
    lines = {}
    for key, line in (("base", model["projection_base_line"]), ("free", model["projection_line"])):
        if line:
            lines[key] = [line["intercept"] + line["slope"] * (x - b) for x in ends]
    return {"steps": [b, *report["steps"]], "projection": [0.0, *model["projection"]], "ends": ends, "lines": lines}


def draw_figures(
    report: dict[str, Any], stats: list[TensorStats], *, out: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """Write the PNG figures into ``out``; return ({figure: file name}, {figure left out: why})."""
    plt = pyplot()
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    adapter = report["source"] == "adapter"
    needs_cks = "needs the checkpoints (an adapter records one drift per tensor)"

    def save(key: str, fig: Any) -> None:
        _save(fig, out / FIGURES[key], plt)
        written[key] = FIGURES[key]

    recorded = " (as extract recorded it)" if adapter else ""
    for key, value, title in (
        ("r2_heatmap", "r2", f"Pooled R² per tensor{recorded}"),
        ("rank1_energy_heatmap", "energy", "Share of each 2-D weight's drift energy in rank 1"),
    ):
        hm = heatmap(stats, value)
        values = [v for row in hm.grid for v in row] + hm.other_values
        if all(v is None for v in values):
            if value == "r2":
                skipped[key] = SHORT_NEEDS_TWO if not has_r2(report) else "nothing moved"
            else:
                skipped[key] = "an adapter records rank-1 energy only at rank 1" if adapter else "no 2-D weight moved"
            continue
        save(key, _heatmap_figure(plt, hm, title))

    elems = [r for s in stats for r in s.elem_r2]
    m = report["model"]
    if elems:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(elems, bins=max(5, min(50, round(math.sqrt(len(elems))))), range=(0, 1), color="tab:blue")
        ax.axvline(R2_THRESHOLD, color="tab:red", linestyle="--", label=f"R² = {R2_THRESHOLD}")
        ax.set_xlabel(f"per-element R² ({m['elem_sampled']:,} sampled in {m['tensors']} tensors, moving ones kept)")
        ax.set_ylabel("elements")
        small = " — small sample" if len(elems) < SMALL_SAMPLE else ""
        ax.set_title(f"Per-element R²: median {fmt(m['elem_r2_median'])}, n = {len(elems):,} elements{small}")
        ax.legend()
        save("element_r2_hist", fig)
    else:
        skipped["element_r2_hist"] = (
            needs_cks if adapter else SHORT_NEEDS_TWO if not has_r2(report) else "nothing moved"
        )

    if adapter:  # one recorded point per tensor: no trajectory to draw
        skipped["drift_norm_vs_step"] = skipped["trajectory_projection"] = needs_cks
        return written, skipped
    xs = [report["base_step"], *report["steps"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.get_cmap("tab20").colors
    for k, (typ, g) in enumerate(report["by_module_type"].items()):
        ax.plot(xs, [0.0, *g["delta_norms"]], marker="o", label=typ, color=colors[k % len(colors)])
    ax.set_xlabel("step")
    ax.set_ylabel("‖W_step − W_base‖ (all tensors of the type)")
    ax.set_title("Drift norm vs step, per module type")
    ax.legend(fontsize=7, ncol=2)
    save("drift_norm_vs_step", fig)

    traj = trajectory_data(report)
    if traj and has_r2(report):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot(traj["steps"], traj["projection"], "o", color="tab:blue", label="base and checkpoints", zorder=3)
        base, free = traj["lines"].get("base"), traj["lines"].get("free")
        if base:
            label = "extract's line: through the base, slope ‖D‖ / t_ref"
            ax.plot(traj["ends"], base, "-", color="tab:orange", label=label)
        if free:
            r2 = report["model"]["projection_line"]["r2"]
            ax.plot(traj["ends"], free, ":", color="gray", label=f"free line with intercept (projection r² {r2:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("projection on the drift direction ⟨W − W_base, D̂⟩")
        ax.set_title("The whole model's trajectory along its drift")
        ax.legend()
        save("trajectory_projection", fig)
    else:
        skipped["trajectory_projection"] = "needs two or more checkpoints (a line through the base fits one exactly)"

    lp = report.get("logprobs")
    if lp and lp.get("r2_values"):
        fig, ax = plt.subplots(figsize=(6, 4))
        n = len(lp["r2_values"])
        ax.hist(lp["r2_values"], bins=max(5, min(40, round(math.sqrt(n)))), range=(0, 1), color="tab:green")
        ax.axvline(R2_THRESHOLD, color="tab:red", linestyle="--")
        ax.set_xlabel(f"per-token log-prob R² (tokens that moved > {lp['min_move']})")
        ax.set_ylabel("tokens")
        ax.set_title(f"Log-prob linearity: median {fmt(lp['r2_median'])}, n = {n:,} tokens")
        save("logprob_r2_hist", fig)
    return written, skipped


def _heatmap_figure(plt: Any, hm: Heatmap, title: str) -> Any:
    """The layer stack (layers × module types) and, at its right, the tensors outside it, on one colour scale; grey:
    nothing measured there."""
    import numpy as np

    panels = (["layers"] if hm.layers and hm.types else []) + (["others"] if hm.others else [])
    widths = [len(hm.types) if p == "layers" else 1.0 for p in panels]
    rows = max(len(hm.layers), len(hm.others))
    size = (max(5.5, 1.8 + 0.5 * sum(widths) + (2.0 if hm.others else 0)), max(3.5, 1.9 + 0.32 * rows))
    fig, axes = plt.subplots(1, len(panels), figsize=size, width_ratios=widths, layout="constrained", squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
    im = None
    for ax, panel in zip(axes[0], panels, strict=True):
        data = hm.grid if panel == "layers" else [[v] for v in hm.other_values]
        arr = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(arr), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        if arr.size <= 160:
            for (i, j), v in np.ndenumerate(arr):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "k")
        if panel == "layers":
            ax.set_xticks(range(len(hm.types)), hm.types, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(hm.layers)), hm.layers)
            ax.set(xlabel="tensor in the layer", ylabel="layer")
        else:
            ax.set_xticks([])
            ax.set_yticks(range(len(hm.others)), hm.others, fontsize=8)
            ax.set_xlabel("outside the layers")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    return fig


def _save(fig: Any, path: Path, plt: Any) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    plt.close(fig)
