"""``driftmerge extract`` on one process against ``torchrun`` with N ranks, and the throughput per GB read.

    python bench/distributed.py [--size 0.4b] [--checkpoints 3] [--ranks 2] [--repeats 3] [--json FILE]

Alternates, on warm inputs: one process with the machine's default threads, one process with one thread, and
``torchrun --standalone --nproc-per-node N`` (one thread per rank, torchrun's default). Reports median wall times
and GB of input read per second (base + checkpoints, bf16), the figures docs/distributed.md builds its model on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from common import build_run, machine, measure, params, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.4b")
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base, cks = build_run(args.root, args.size, args.checkpoints)
    warm([base, *cks])
    read_gb = sum(f.stat().st_size for p in (base, *cks) for f in p.glob("*.safetensors")) / 1e9
    out = args.root / "distributed-out"
    extract = ["extract", str(base), *map(str, cks), "-o", str(out), "--overwrite"]
    variants = {
        "1 process, default threads": ([sys.executable, "-m", "driftmerge", *extract], {}),
        "1 process, 1 thread": ([sys.executable, "-m", "driftmerge", *extract], {"OMP_NUM_THREADS": "1"}),
        f"torchrun, {args.ranks} ranks x 1 thread": (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={args.ranks}",
                "-m",
                "driftmerge",
                *extract,
            ],
            {"OMP_NUM_THREADS": "1"},
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (cmd, env) in variants.items():
            run = measure(cmd, env)
            if run.returncode != 0:
                sys.exit(f"{name} failed:\n{run.stderr[-2000:]}")
            times[name].append(run.wall_s)
    shutil.rmtree(out, ignore_errors=True)
    rows = {k: {"median_s": statistics.median(v), "runs_s": v, "gb_per_s": read_gb / statistics.median(v)}
            for k, v in times.items()}  # fmt: skip
    result = {"date": date.today().isoformat(), "machine": machine(), "size": args.size, "params": params(args.size),
              "checkpoints": args.checkpoints, "read_gb": read_gb, "rows": rows}  # fmt: skip
    print(f"{args.size}, {args.checkpoints} checkpoint(s), {read_gb:.2f} GB read, {machine()}")
    for k, r in rows.items():
        print(f"  {k:<32} median {r['median_s']:6.2f} s   {r['gb_per_s']:.3f} GB/s of input")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
