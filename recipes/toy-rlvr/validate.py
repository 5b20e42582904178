#!/usr/bin/env python
# Run:   python recipes/toy-rlvr/validate.py [--seeds 0,1,2] [--default] [-o validation-out]
#
# Tests the claims driftmerge rests on, on the toy RLVR recipe (the --small setting unless --default), per seed:
#   1. linearity of the RL trajectory vs the SFT-control trajectory (`analyze`: pooled and per-element R²);
#   2. rank: the drift energy in rank 1, and the accuracy of the rank-1 model (`extract --rank 1`, `apply --scale 1`)
#      against the full last checkpoint;
#   3. extrapolation: fitted on checkpoints up to step S, `apply --step T` against the real checkpoint at T > S, and
#      the best scale `sweep` finds;
#   4. re-grounding: GRPO steps to reach a held-out accuracy threshold, plain and with periodic extrapolation;
#   5. output extrapolation: `generate --alpha 1.5` between two checkpoints against the later one.
# It writes results.json, results.md (the tables docs/validation.md quotes) and figures into the output folder.
# About 3 minutes per seed at the small setting on 2 CPU cores.
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from toyrl import accuracy, config_for, reward, run, steps_to_threshold, supervised_start, write_prompts

from driftmerge.commands.analyze import AnalyzeOptions, analyze
from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.commands.sweep import SweepOptions, run_sweep
from driftmerge.evaluation.generation import SamplingOptions, generate
from driftmerge.io.models import load_causal_lm
from driftmerge.reports.linearity import pyplot

EXTRAP_FROM = 100  # fit on checkpoints up to this step ...
EXTRAP_TO = (125, 150, 200)  # ... and compare with the real checkpoints at these steps
SWEEP_SCALES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
THRESHOLD, MAX_STEPS, REGROUND = 0.5, 300, (25, 25)


def acc_of(folder: Path, tok, held_out, cfg) -> float:
    return accuracy(load_causal_lm(folder), tok, pairs=held_out, max_new_tokens=cfg.max_new_tokens)


def one_seed(seed: int, small: bool, root: Path) -> dict:
    cfg = config_for(small, seed)
    t0 = time.perf_counter()
    model, tok, info = supervised_start(cfg)
    held_out = info["held_out"]
    runs = {}
    for kind in ("rl", "sft"):
        runs[kind] = run(root / kind, cfg, kind, start=(copy.deepcopy(model), tok, info))
    steps = [e["step"] for e in runs["rl"]["evals"][1:]]
    cks = {kind: [root / kind / f"checkpoint-{s}" for s in steps] for kind in runs}
    out: dict = {
        "seed": seed,
        "evals": {k: r["evals"] for k, r in runs.items()},
        "train_reward": runs["rl"]["train_reward"],
    }

    # 1. linearity, and 2. rank-1 energy
    for kind in runs:
        rep = analyze(
            root / kind / "base", cks[kind], out_dir=root / f"analysis-{kind}", options=AnalyzeOptions(sample_frac=0.05)
        ).report
        m = rep["model"]
        out[f"linearity_{kind}"] = {k: m[k] for k in ("r2", "elem_r2_median", "elem_r2_share_above", "energy_rank1")}

    # 2. the rank-1 model vs the full last checkpoint
    extract(root / "rl" / "base", cks["rl"], out_dir=root / "rank1", options=ExtractOptions(rank=1))
    energies = [
        r["energy"]
        for r in json.loads((root / "rank1" / "driftmerge.json").read_text())["tensors"].values()
        if r["stored"] == "lora"
    ]
    apply_drift(root / "rank1", root / "rank1-model", options=ApplyOptions(scale=1.0))
    out["rank"] = {
        "median_matrix_energy_rank1": statistics.median(energies),
        "acc_rank1_scale1": acc_of(root / "rank1-model", tok, held_out, cfg),
        "acc_last_checkpoint": runs["rl"]["evals"][-1]["accuracy"],
        "acc_base": runs["rl"]["evals"][0]["accuracy"],
    }

    # 3. extrapolation from the checkpoints up to EXTRAP_FROM
    early = [c for c, s in zip(cks["rl"], steps, strict=True) if s <= EXTRAP_FROM]
    for rank, name in ((1, "early-rank1"), (1.0, "early-full")):
        extract(root / "rl" / "base", early, out_dir=root / name, options=ExtractOptions(rank=rank))
    real = {e["step"]: e["accuracy"] for e in runs["rl"]["evals"]}
    rows = []
    for t in EXTRAP_TO:
        row = {"step": t, "real": real[t]}
        for name in ("early-rank1", "early-full"):
            apply_drift(root / name, root / f"{name}-{t}", options=ApplyOptions(step=t))
            row[name] = acc_of(root / f"{name}-{t}", tok, held_out, cfg)
        rows.append(row)
    out["extrapolation"] = rows
    prompts = write_prompts(root / "held_out.jsonl", held_out)
    sampling = SamplingOptions(max_new_tokens=cfg.max_new_tokens, batch_size=256)
    sw = run_sweep(root / "early-rank1", prompts, opts=SweepOptions(SWEEP_SCALES, sampling=sampling, device="cpu"))
    out["sweep"] = {"rows": [(r.scale, r.step, r.mean, r.se) for r in sw.rows], "best": sw.best.scale}

    # 4. re-grounding
    start = (model, tok, info)  # `run` worked on copies: this is still the supervised start
    plain = steps_to_threshold(start, cfg, THRESHOLD, MAX_STEPS)
    regr = steps_to_threshold(start, cfg, THRESHOLD, MAX_STEPS, reground=REGROUND)
    out["reground"] = {"plain": plain, "reground": regr}

    # 5. output extrapolation between checkpoint-100 and the last one
    a, b = load_causal_lm(cks["rl"][steps.index(EXTRAP_FROM)]), load_causal_lm(cks["rl"][-1])
    texts = generate(
        b,
        tok,
        prompts=[p for p, _ in held_out],
        opts=SamplingOptions(max_new_tokens=cfg.max_new_tokens, batch_size=256),
        early=a,
        alpha=1.5,
    )
    out["logits"] = {
        "early_step": EXTRAP_FROM,
        "late_step": steps[-1],
        "acc_alpha_1.5": sum(reward(t[0], ans) for t, (_, ans) in zip(texts, held_out, strict=True)) / len(held_out),
        "acc_late": runs["rl"]["evals"][-1]["accuracy"],
    }
    out["seconds"] = time.perf_counter() - t0
    print(f"seed {seed}: done in {out['seconds']:.0f} s", flush=True)
    return out


def figures(results: list[dict], folder: Path) -> None:
    plt = pyplot("validate")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        for kind, style in (("rl", "-"), ("sft", ":")):
            ev = r["evals"][kind]
            ax.plot(
                [e["step"] for e in ev],
                [e["accuracy"] for e in ev],
                style,
                marker=".",
                label=f"{kind.upper()} seed {r['seed']}",
            )
    ax.set_xlabel("step after the supervised start")
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ev = r["evals"]["rl"]
        (line,) = ax.plot(
            [e["step"] for e in ev], [e["accuracy"] for e in ev], marker=".", label=f"real, seed {r['seed']}"
        )
        ex = r["extrapolation"]
        ax.plot(
            [e["step"] for e in ex],
            [e["early-rank1"] for e in ex],
            "x--",
            color=line.get_color(),
            label=f"extrapolated from ≤{EXTRAP_FROM}, seed {r['seed']}",
        )
    ax.axvline(EXTRAP_FROM, color="grey", linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "extrapolation.png", dpi=100)
    plt.close(fig)


def tables(results: list[dict]) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "| seed | run | pooled R² | per-element R² median | share > 0.7 | rank-1 energy |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for kind in ("rl", "sft"):
            m = r[f"linearity_{kind}"]
            lines.append(
                f"| {r['seed']} | {kind.upper()} | {f(m['r2'])} | {f(m['elem_r2_median'])} | "
                f"{f(m['elem_r2_share_above'])} | {f(m['energy_rank1'])} |"
            )
    lines += [
        "",
        "| seed | base acc | last checkpoint acc | rank-1 model acc | median per-matrix rank-1 energy |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        k = r["rank"]
        lines.append(
            f"| {r['seed']} | {f(k['acc_base'])} | {f(k['acc_last_checkpoint'])} | {f(k['acc_rank1_scale1'])} "
            f"| {f(k['median_matrix_energy_rank1'])} |"
        )
    lines += [
        "",
        "| seed | step T | real checkpoint | extrapolated, rank 1 | extrapolated, full rank |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for e in r["extrapolation"]:
            lines.append(
                f"| {r['seed']} | {e['step']} | {f(e['real'])} | {f(e['early-rank1'])} | {f(e['early-full'])} |"
            )
    lines += ["", "| seed | sweep (scale: accuracy) | best scale |", "|---|---|---|"]
    for r in results:
        cells = ", ".join(f"{s:g}: {m:.3f}" for s, _, m, _ in r["sweep"]["rows"])
        lines.append(f"| {r['seed']} | {cells} | {r['sweep']['best']:g} |")
    lines += [
        "",
        f"| seed | plain GRPO steps to {THRESHOLD} | with re-grounding {REGROUND} | jumps |",
        "|---|---|---|---|",
    ]
    for r in results:
        g = r["reground"]
        lines.append(f"| {r['seed']} | {g['plain']['steps']} | {g['reground']['steps']} | {g['reground']['jumps']} |")
    lines += ["", "| seed | checkpoint-100 → last, alpha 1.5 | last checkpoint |", "|---|---|---|"]
    for r in results:
        lg = r["logits"]
        lines.append(f"| {r['seed']} | {f(lg['acc_alpha_1.5'])} | {f(lg['acc_late'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--default", action="store_true", help="the default (larger) setting instead of --small")
    ap.add_argument("-o", "--output", default="validation-out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = [one_seed(int(s), not args.default, out / f"seed{s}") for s in args.seeds.split(",")]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(tables(results))
    figures(results, out)
    print(tables(results))


if __name__ == "__main__":
    main()
