#!/usr/bin/env python
# Run:   python recipes/toy-rlvr/run.py [--small] [--mode rl|sft] [--seed 0] [-o toy-run]
#
# A real (tiny) RLVR run on 2 CPU cores, no downloads: a small Llama-shaped model and a character tokenizer are
# built locally, trained with supervision on multi-digit addition ("12+345=" -> "357") to partial accuracy, then
# trained with GRPO and a verifiable 0/1 reward (the completion's number equals the sum), saving Hugging Face
# checkpoints `checkpoint-<step>/` every few steps, the TRL layout `driftmerge extract --run-dir` reads.
#
#   --small      2-digit operands, 200 GRPO steps, a checkpoint every 25: about 40 s (CI and `driftmerge demo`)
#                (default: a wider model, 600 steps, a checkpoint every 50: about 4 minutes)
#   --mode sft   the control experiment: the RL stage replaced by continued supervised training on the same
#                prompts with their correct answers (same start, same steps, same checkpoints)
#   --seed N     seeds the model, the data and the sampling: the same seed gives the same run
#   --kl-coef B  GRPO's KL penalty against the supervised start (TRL's beta; default 0: none)
#   --hidden, --lr, --steps, --save-every, --threads   override the setting (the regime grid's knobs); the run
#                `driftmerge demo` ships is --small --seed 0 --hidden 128 --lr 5e-5 --kl-coef 0.1 --steps 600
#                --save-every 75 --threads 1
#
# Then, for example:
#   driftmerge extract toy-run/base --run-dir toy-run -o toy-drift
#   driftmerge analyze toy-run/base toy-run/checkpoint-* -o toy-analysis
#   python recipes/toy-rlvr/validate.py      (the claims of docs/validation.md, over 3 seeds)
from __future__ import annotations

import argparse
import dataclasses

import torch
from toyrl import config_for, run


def main() -> None:
    ap = argparse.ArgumentParser(description="A toy RLVR run (supervised start, then GRPO or the SFT control).")
    ap.add_argument("--small", action="store_true", help="the CI / demo setting (about 40 s on 2 cores)")
    ap.add_argument("--mode", choices=["rl", "sft"], default="rl", help="rl: GRPO; sft: the supervised control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-coef", type=float, default=0.0, help="GRPO's KL penalty against the start (TRL's beta)")
    ap.add_argument("--hidden", type=int, help="model width [default: the setting's, 64 with --small]")
    ap.add_argument("--lr", type=float, help="the GRPO (or SFT control) learning rate [default: 5e-4]")
    ap.add_argument("--steps", type=int, help="GRPO (or SFT control) steps [default: 200 with --small]")
    ap.add_argument("--save-every", type=int, help="a checkpoint every this many steps [default: 25 with --small]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (regimes.py runs use 1)")
    ap.add_argument("-o", "--output", default="toy-run", help="run folder: base/, checkpoint-<step>/, run.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    given = {"hidden": args.hidden, "rl_lr": args.lr, "rl_steps": args.steps, "save_every": args.save_every}
    cfg = config_for(args.small, args.seed, kl_coef=args.kl_coef, **{k: v for k, v in given.items() if v is not None})
    print("config:", dataclasses.asdict(cfg), flush=True)
    record = run(args.output, cfg, args.mode, log=lambda s: print(s, flush=True))
    print(f"wrote {args.output}: base/ and {len(record['evals']) - 1} checkpoints in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
