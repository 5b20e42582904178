#!/usr/bin/env python
# Run:   python recipes/toy-rlvr/regimes.py [-o regimes-out] [--workers 2] [--widths 64,128] [--lrs 5e-4,1.5e-4,5e-5]
#                                          [--kl 0.1] [--seeds 0,1,2] [--steps 200] [--checkpoints 8]
#                                          [--longer 5e-5:600 ...] [--longer-widths 128]
#
# When does the drift of the toy RLVR run extrapolate? A grid over the knobs that plausibly decide it: the learning
# rate, a KL penalty against the supervised start (GRPO only) and the model width, 3 seeds each, with the SFT
# control at every learning rate. Per (width, seed) one supervised start is trained and every run of the grid starts
# from a copy of it. Per run, with driftmerge's own commands (measures.py):
#   analyze over all checkpoints and over the first half: pooled and per-element R², rank-1 energy, ...;
#   extract --rank 1 over all checkpoints, apply --scale 1: the rank-1 model's accuracy, as a share of the gain;
#   extract over the first half, apply --step <last>: accuracy minus the real last checkpoint's (extrapolation gain);
#   sweep of the all-checkpoint adapter: the scale it picks.
# Each finished run leaves <out>/<run>/result.json, so a stopped grid picks up where it was. At the end:
# regimes.json (every number), regimes.md (the tables) and regimes.png (each measure against the learning rate).
# About an hour on 2 CPU cores (docs/validation.md, "Regimes"). Ctrl-C stops it; the same command resumes.
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import signal
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from measures import measure
from regime_report import figure, predictors, tables
from toyrl import config_for, run, supervised_start


def run_id(mode: str, width: int, lr: float, kl: float, seed: int, steps: int, base_steps: int) -> str:
    longer = f"-t{steps}" if steps != base_steps else ""
    return f"{mode}-w{width}-lr{lr:g}-kl{kl:g}{longer}-s{seed}"


def group_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per (width, seed): the runs sharing its supervised start, widest first (the longest jobs). A run is
    ``(mode, lr, kl, steps)``: every learning rate at ``--steps``, and the ``--longer`` ones at their own steps (at the
    ``--longer-widths``)."""
    plan = []
    for width in sorted(args.widths, reverse=True):
        longer = args.longer if args.longer_widths is None or width in args.longer_widths else []
        for seed in args.seeds:
            runs = []
            for lr, steps in [(lr, args.steps) for lr in args.lrs] + longer:
                runs += [("rl", lr, kl, steps) for kl in (0.0, args.kl)]
                runs.append(("sft", lr, 0.0, steps))
            plan.append(
                {"width": width, "seed": seed, "base_steps": args.steps, "checkpoints": args.checkpoints,
                 "runs": runs, "out": str(args.output)}
            )  # fmt: skip
    return plan


def group_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one supervised start, then every run of the group from a copy of it, and measure each."""
    torch.set_num_threads(1)  # one worker per core
    out, width, seed = Path(job["out"]), job["width"], job["seed"]
    ids = [run_id(m, width, lr, kl, seed, t, job["base_steps"]) for m, lr, kl, t in job["runs"]]
    done = {i: out / i / "result.json" for i in ids}
    if all(p.is_file() for p in done.values()):
        return [json.loads(p.read_text()) for p in done.values()]
    t0 = time.perf_counter()
    start = supervised_start(
        config_for(True, seed, hidden=width), log=lambda s: print(f"[w{width} s{seed}] {s}", flush=True)
    )
    start_seconds = time.perf_counter() - t0
    results = []
    for (mode, lr, kl, steps), rid in zip(job["runs"], ids, strict=True):
        if done[rid].is_file():
            results.append(json.loads(done[rid].read_text()))
            continue
        shutil.rmtree(out / rid, ignore_errors=True)  # what a stopped grid left of this run
        every = steps // job["checkpoints"]
        cfg = config_for(True, seed, hidden=width, rl_steps=steps, save_every=every, rl_lr=lr, kl_coef=kl)
        t1 = time.perf_counter()
        record = run(out / rid / "run", cfg, mode, log=lambda s: None, start=(copy.deepcopy(start[0]), *start[1:]))
        train_seconds = time.perf_counter() - t1
        res = {
            "id": rid,
            "mode": mode,
            "width": width,
            "lr": lr,
            "kl_coef": kl,
            "seed": seed,
            "steps": steps,
            "sft_steps": record["sft_steps"],
            "start_seconds": start_seconds,
            "train_seconds": train_seconds,
            "evals": record["evals"],
            "mean_train_kl": sum(record["train_kl"]) / len(record["train_kl"]) if record["train_kl"] else None,
            **measure(out / rid, cfg, tok=start[1], held_out=start[2]["held_out"], evals=record["evals"]),
        }
        done[rid].write_text(json.dumps(res, indent=1) + "\n")
        gain = res["acc_last"] - res["acc_base"]
        print(
            f"{rid}: {train_seconds:.0f} s training, {res['measure_seconds']:.0f} s measuring; accuracy "
            f"{res['acc_base']:.3f} -> {res['acc_last']:.3f} ({gain:+.3f}), pooled R² {res['all']['r2']:.3f}, "
            f"extrapolation gain {res['extrap_gain']:+.3f}, sweep picks {res['sweep_best']:g}",
            flush=True,
        )
        results.append(res)
    return results


def lr_steps(text: str) -> tuple[float, int]:
    lr, steps = text.split(":")
    return float(lr), int(steps)


def main() -> None:
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731  ("": none, with --longer alone)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description="The regime grid of the toy RLVR run (docs/validation.md, Regimes).")
    ap.add_argument("-o", "--output", type=Path, default=Path("regimes-out"))
    ap.add_argument("--workers", type=int, default=2, help="processes, one CPU core each")
    ap.add_argument("--widths", type=ints, default=[64, 128])
    ap.add_argument("--lrs", type=floats, default=[5e-4, 1.5e-4, 5e-5], help="GRPO (and SFT control) learning rates")
    ap.add_argument("--kl", type=float, default=0.1, help="the KL coefficient > 0 of the grid (the other is 0)")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200, help="RL / SFT steps after the supervised start")
    ap.add_argument("--checkpoints", type=int, default=8, help="checkpoints per run, evenly spaced")
    ap.add_argument(
        "--longer", type=lr_steps, action="append", default=[], metavar="LR:STEPS",
        help="also run this learning rate for this many steps (repeatable), e.g. 5e-5:600",
    )  # fmt: skip
    ap.add_argument("--longer-widths", type=ints, default=None, help="the widths --longer applies to [default: all]")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = group_plan(args)
    pool = get_context("spawn").Pool(args.workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:  # the workers ignore Ctrl-C: the parent stops them, and the next run of the command resumes
        results = [r for group in pool.map(group_job, plan, chunksize=1) for r in group]
    except KeyboardInterrupt:
        pool.terminate()
        pool.join()
        print(f"stopped: the finished runs stay in {args.output}; the same command resumes from them", file=sys.stderr)
        sys.exit(130)
    pool.close()
    pool.join()
    record = {
        "command": "python recipes/toy-rlvr/regimes.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - t0,  # of this invocation (a resumed grid only reads finished runs)
        "grid": {k: v for k, v in vars(args).items() if k != "output"},
        "runs": results,
        "predictors": predictors(results),
    }
    (args.output / "regimes.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.output / "regimes.md").write_text(tables(record))
    figure(results, args.output / "regimes.png")
    print(tables(record))
    print(f"grid done in {record['wall_seconds'] / 60:.1f} min: {args.output}")


if __name__ == "__main__":
    main()
