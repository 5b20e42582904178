"""What ``sweep`` writes: ``sweep.json``, ``sweep.md`` (the table), ``sweep.png`` (reward vs scale, checkpoints
marked) and ``completions.jsonl`` (every sample with its prompt, reference answer and reward).

Per scale the table gives the mean reward over all ``samples`` (completions scored: prompts × ``--samples``) and
``± se``, its standard error over the ``prompts``: ``sd(per-prompt means) / sqrt(prompts)``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from driftmerge.evaluation.scoring import SweepResult
from driftmerge.reports.linearity import md_table, pyplot

SWEEP_FORMAT = "driftmerge-sweep"


def to_json(result: SweepResult, settings: dict[str, Any]) -> dict[str, Any]:
    best = result.best
    return {
        "format": SWEEP_FORMAT,
        "version": 1,
        "mode": result.mode,
        "settings": settings,
        "checkpoints": [{"step": s, "scale": x} for s, x in result.checkpoint_scales],
        "rows": [{**asdict(r), "prompts": len(r.prompt_means), "samples": r.n} for r in result.rows],
        "best": {"scale": best.scale, "step": best.step, "mean": best.mean, "se": best.se},
    }


def table_rows(result: SweepResult) -> list[list[str]]:
    """Header + one row per scale; the best is starred. ``prompts`` and ``samples`` (completions scored) are
    counted apart: ``± se`` is over prompts, the mean over samples."""
    what = "alpha" if result.mode == "logits" else "scale"
    rows = [[what, "step", "mean reward", "± se", "prompts", "samples"]]
    best = result.best
    for r in result.rows:
        mark = " *" if r is best else ""
        se = "n/a" if r.se is None else f"{r.se:.4f}"
        counts = [str(len(r.prompt_means)), str(r.n)] if r.n else ["external", "external"]
        rows.append([f"{r.scale:g}{mark}", f"{r.step:g}", f"{r.mean:.4f}", se, *counts])
    return rows


def legend(result: SweepResult) -> str:
    """What the columns count, in one line under the table."""
    if not any(r.n for r in result.rows):
        return "mean reward and ± se as the external evaluator (--eval-cmd) reported them; * = best"
    return "mean reward over all samples (prompts × --samples); ± se: its standard error over prompts; * = best"


def text_table(result: SweepResult) -> str:
    """The table for a terminal, with its legend."""
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*lines, legend(result)])


def write_outputs(result: SweepResult, out: Path, *, settings: dict[str, Any]) -> list[str]:
    """Write the files into ``out`` (an existing folder); return their names."""
    (out / "sweep.json").write_text(json.dumps(to_json(result, settings), indent=2) + "\n")
    best = result.best
    what = "alpha" if result.mode == "logits" else "scale"
    md = [
        f"# driftmerge sweep ({result.mode})",
        "",
        *md_table(table_rows(result)),
        "",
        legend(result),
        "",
        f"Best {what}: **{best.scale:g}** (step {best.step:g}), mean reward {best.mean:.4f}"
        + ("" if best.se is None else f" ± {best.se:.4f}"),
        "",
        "![reward vs scale](sweep.png)",
    ]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    written = ["sweep.json", "sweep.md"]
    if result.completions:
        with (out / "completions.jsonl").open("w") as f:
            for c in result.completions:
                f.write(json.dumps(c) + "\n")
        written.append("completions.jsonl")
    draw(result, out / "sweep.png")
    return [*written, "sweep.png"]


def draw(result: SweepResult, path: Path) -> None:
    """Reward vs scale with ± se bars; dotted lines at the checkpoints' scales (weights mode)."""
    plt = pyplot("sweep")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.scale for r in result.rows]
    ys = [r.mean for r in result.rows]
    errs = [r.se or 0.0 for r in result.rows]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ax.errorbar([xs[i] for i in order], [ys[i] for i in order], yerr=[errs[i] for i in order], marker="o", capsize=3)
    if result.mode == "weights":
        for step, scale in result.checkpoint_scales:
            ax.axvline(scale, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                f"step {step}",
                (scale, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="right",
                color="grey",
            )
    best = result.best
    ax.plot([best.scale], [best.mean], marker="*", markersize=14, color="tab:red", linestyle="none", label="best")
    ax.set_xlabel("alpha (logit extrapolation)" if result.mode == "logits" else "scale (1 = last checkpoint)")
    ax.set_ylabel("mean reward")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
