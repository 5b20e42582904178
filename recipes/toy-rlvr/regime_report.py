"""The regime grid's tables, figure and predictor scores, from the per-run results of ``regimes.py``."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driftmerge.reports.linearity import pyplot

# the measures `analyze` reports, read on the first half of the checkpoints: candidates to predict extrapolation
PREDICTORS = {
    "r2": "pooled R²",
    "r2_tensor_median": "median per-tensor R²",
    "elem_r2_median": "per-element R² median",
    "elem_r2_share_above": "share of elements with R² > 0.7",
    "energy_rank1": "rank-1 energy",
    "projection_r2": "R² of the projection on the drift direction",
}
KINDS = (("rl", 0), ("rl", 1), ("sft", 0))  # (mode, KL on)


def kind(r: dict[str, Any]) -> tuple[str, int]:
    return r["mode"], int(r["kl_coef"] > 0)


def label(k: tuple[str, int], kl: float) -> str:
    return "SFT" if k[0] == "sft" else f"RL, KL {kl:g}" if k[1] else "RL, no KL"


def predictors(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How well each ``analyze`` measure on the first half of the checkpoints predicts the extrapolation gain, over
    the GRPO runs and over all runs: Spearman's ρ with the gain, and the AUC of telling a positive gain from the rest
    (``P(measure of a positive-gain run > measure of another)``, ties counted half; None without both classes; ρ is
    None where the measure or the gain does not vary)."""
    from scipy.stats import mannwhitneyu

    out: dict[str, Any] = {}
    for name, runs in (("rl", [r for r in results if r["mode"] == "rl"]), ("all", results)):
        gains = [r["extrap_gain"] for r in runs]
        pos = [g > 0 for g in gains]
        scores = {}
        for key in PREDICTORS:
            xs = [r["early"][key] for r in runs]
            rho = _rho(xs, gains)
            a = [x for x, p in zip(xs, pos, strict=True) if p]
            b = [x for x, p in zip(xs, pos, strict=True) if not p]
            auc = mannwhitneyu(a, b).statistic / (len(a) * len(b)) if a and b else None
            scores[key] = {"spearman": rho, "auc": None if auc is None else float(auc)}
        out[name] = {"runs": len(runs), "positive_gain": sum(pos), "scores": scores}
    # what the gain follows besides the measures, and each measure's ρ among the GRPO runs of one learning rate
    rl = [r for r in results if r["mode"] == "rl"]
    lrs = sorted({r["lr"] for r in rl})
    out["rl"]["gain_vs"] = {
        "lr": _rho([r["lr"] for r in rl], [r["extrap_gain"] for r in rl]),
        "accuracy_gain": _rho([r["acc_last"] - r["acc_base"] for r in rl], [r["extrap_gain"] for r in rl]),
    }
    out["rl"]["within_lr"] = {
        key: {
            f"{lr:g}": _rho(
                [r["early"][key] for r in rl if r["lr"] == lr], [r["extrap_gain"] for r in rl if r["lr"] == lr]
            )
            for lr in lrs
        }
        for key in PREDICTORS
    }
    return out


def _rho(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's ρ, None where either side does not vary."""
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic) if len(set(xs)) > 1 and len(set(ys)) > 1 else None


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def settings(results: list[dict[str, Any]]) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
    """The runs grouped by setting (width, learning rate, steps, mode, KL on), seeds together, in table order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["width"], -r["lr"], r["steps"], *kind(r)), []).append(r)
    return [(k, sorted(v, key=lambda r: r["seed"])) for k, v in sorted(groups.items())]


def beyond(r: dict[str, Any]) -> float:
    """The best accuracy the sweep found beyond the last checkpoint (scales > 1 of the all-checkpoint adapter)."""
    return max((row["accuracy"] for row in r["sweep"] if row["scale"] > 1), default=float("-inf"))


# the claims, counted per setting over its GRPO runs
CLAIMS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "rank-1 energy ≥ 0.5": lambda r: r["all"]["energy_rank1"] >= 0.5,
    "rank-1 share ≥ 0.8": lambda r: r["rank1_share"] is not None and r["rank1_share"] >= 0.8,
    "extrapolation gain > 0": lambda r: r["extrap_gain"] > 0,
    "sweep picks > 1": lambda r: r["sweep_best"] > 1,
    "a scale > 1 beats the last checkpoint": lambda r: beyond(r) > r["acc_last"],
}


def tables(record: dict[str, Any]) -> str:
    f: Callable[[float | None], str] = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    sg: Callable[[float], str] = lambda x: f"{x:+.3f}"  # noqa: E731
    kl = record["grid"]["kl"]
    lines = [
        "| width | LR | steps | run | accuracy gain (per seed) | pooled R² | per-element R² median | rank-1 energy "
        "| rank-1 share of the gain | extrapolation gain (per seed) | sweep picks (per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (width, neg_lr, steps, mode, kl_on), runs in settings(record["runs"]):
        gains = " / ".join(sg(r["acc_last"] - r["acc_base"]) for r in runs)
        lines.append(
            f"| {width} | {-neg_lr:g} | {steps} | {label((mode, kl_on), kl)} | {gains} "
            f"| {f(_mean([r['all']['r2'] for r in runs]))} | {f(_mean([r['all']['elem_r2_median'] for r in runs]))} "
            f"| {f(_mean([r['all']['energy_rank1'] for r in runs]))} | {f(_mean([r['rank1_share'] for r in runs]))} "
            f"| {' / '.join(sg(r['extrap_gain']) for r in runs)} "
            f"| {' / '.join(format(r['sweep_best'], 'g') for r in runs)} |"
        )
    lines += [
        "",
        f"| width | LR | steps | run | pooled R² minus the SFT control's (per seed) | {' | '.join(CLAIMS)} |",
        "|---|---|---|---|---|" + "---|" * len(CLAIMS),
    ]
    sft = {(r["width"], r["lr"], r["steps"], r["seed"]): r for r in record["runs"] if r["mode"] == "sft"}
    for (width, neg_lr, steps, mode, kl_on), runs in settings(record["runs"]):
        if mode == "sft":
            continue
        pair = [sft.get((r["width"], r["lr"], r["steps"], r["seed"])) for r in runs]
        diffs = [sg(r["all"]["r2"] - c["all"]["r2"]) if c else "n/a" for r, c in zip(runs, pair, strict=True)]
        counts = " | ".join(f"{sum(map(test, runs))} of {len(runs)}" for test in CLAIMS.values())
        setting = f"| {width} | {-neg_lr:g} | {steps} | {label((mode, kl_on), kl)} |"
        lines.append(f"{setting} {' / '.join(diffs)} | {counts} |")
    lines += [
        "",
        "| `analyze` measure on the first half | Spearman ρ with the gain (GRPO runs) | AUC, gain > 0 (GRPO runs) "
        "| Spearman ρ (all runs) | AUC (all runs) | ρ within one learning rate (GRPO runs) |",
        "|---|---|---|---|---|---|",
    ]
    pr = record["predictors"]
    for key, name in PREDICTORS.items():
        a, b = pr["rl"]["scores"][key], pr["all"]["scores"][key]
        within = ", ".join(f"{lr}: {f(v)}" for lr, v in pr["rl"]["within_lr"][key].items())
        lines.append(f"| {name} | {f(a['spearman'])} | {f(a['auc'])} | {f(b['spearman'])} | {f(b['auc'])} | {within} |")
    vs = pr["rl"]["gain_vs"]
    lines.append(
        f"\n(GRPO runs: Spearman ρ of the extrapolation gain with the learning rate {f(vs['lr'])}, with the run's own"
        f" accuracy gain {f(vs['accuracy_gain'])})"
    )
    lines.append(
        f"\n(positive extrapolation gain in {pr['rl']['positive_gain']} of {pr['rl']['runs']} GRPO runs and "
        f"{pr['all']['positive_gain']} of {pr['all']['runs']} runs in all)"
    )
    return "\n".join(lines) + "\n"


# (title, value, a reference line: no gain / all of the gain / the last checkpoint)
PANELS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], float | None], ...] = (
    ("pooled R² (all checkpoints)", lambda r: r["all"]["r2"], None),
    ("per-element R² median", lambda r: r["all"]["elem_r2_median"], None),
    ("rank-1 energy", lambda r: r["all"]["energy_rank1"], None),
    ("rank-1 model: share of the gain", lambda r: r["rank1_share"], 1.0),
    ("extrapolation gain (accuracy)", lambda r: r["extrap_gain"], 0.0),
    ("scale sweep picks", lambda r: r["sweep_best"], 1.0),
)


def figure(results: list[dict[str, Any]], path: Path) -> None:
    """Each measure against the learning rate: colour = RL without / with KL and SFT, marker = width, filled = the
    grid's step count and hollow = a longer run, one point per seed (nudged sideways so that series stay apart)."""
    plt = pyplot("regimes")
    widths = sorted({r["width"] for r in results})
    base_steps = min((r["steps"] for r in results), default=0)
    kl = max((r["kl_coef"] for r in results), default=0.0)
    series = sorted({(kind(r), r["width"], r["steps"]) for r in results}, key=lambda k: (KINDS.index(k[0]), *k[1:]))
    lrs = sorted({r["lr"] for r in results})
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (title, value, level) in zip(axes.flat, PANELS, strict=True):
        for k, w, steps in series:
            ki, wi, longer = KINDS.index(k), widths.index(w), steps != base_steps
            runs = [r for r in results if (kind(r), r["width"], r["steps"]) == (k, w, steps)]
            nudge = 1.0 + 0.07 * (ki - 1) + 0.02 * (wi - (len(widths) - 1) / 2) + (0.03 if longer else 0.0)
            pts = [(r["lr"] * nudge, value(r)) for r in runs if value(r) is not None]
            ax.scatter(
                [x for x, _ in pts],
                [y for _, y in pts],
                color=f"C{ki}",
                marker="os^D"[wi % 4],
                facecolors="none" if longer else f"C{ki}",
                s=22,
                label=f"{label(k, kl)}, width {w}" + (f", {steps} steps" if longer else ""),
            )
        if level is not None:
            ax.axhline(level, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learning rate (GRPO / SFT control)")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
