"""How close is ``driftmerge extract`` to the time it takes just to start Python + torch and read its inputs?

    python bench/read_limit.py [--size 0.4b] [--checkpoints 1] [--repeats 3] [--cold]

Each repeat runs, as separate processes on the same inputs: the read floor (``import torch``, then every byte of
every weight file read once into a reused buffer) and ``driftmerge extract --rank 1``. With ``--cold`` the page
cache is dropped before every process (needs root: ``/proc/sys/vm/drop_caches``), so both read from the disk;
otherwise both read warm. Target (issue 19): extract ≤ 1.6 × the floor, warm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from common import SIZES, build_run, console_script, gib, machine, measure, params, stats, warm

READ_FLOOR = """
import sys, torch
buf = bytearray(64 << 20)
view = memoryview(buf)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
"""


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.4b")
    ap.add_argument("--checkpoints", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every process (root)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench")
    ap.add_argument("--extra", default="", help="extra driftmerge extract arguments, e.g. '--device cuda'")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = console_script()
    if not exe:
        sys.exit("the driftmerge console script is not on PATH: pip install -e .")
    base, cks = build_run(args.root, args.size, args.checkpoints)
    files = [str(f) for d in (base, *cks) for f in sorted(d.glob("*.safetensors"))]
    total = sum(Path(f).stat().st_size for f in files)
    out = args.root / "read-limit-out"
    if args.cold:
        try:
            drop_caches()
        except OSError as exc:
            sys.exit(f"--cold needs write access to /proc/sys/vm/drop_caches ({exc})")
    else:
        warm([base, *cks])
    floor, ext = [], []
    cmd = [exe, "extract", str(base), *map(str, cks), "-o", str(out), "--rank", "1", *args.extra.split()]
    shutil.rmtree(out, ignore_errors=True)
    measure(cmd)  # untimed: bytecode cached, as after an install
    for i in range(args.repeats):
        if args.cold:
            drop_caches()
        r = measure([sys.executable, "-c", READ_FLOOR, *files])
        if r.returncode:
            sys.exit(f"read floor failed:\n{r.stderr}")
        floor.append(r.wall_s)
        shutil.rmtree(out, ignore_errors=True)
        if args.cold:
            drop_caches()
        e = measure(cmd)
        if e.returncode:
            sys.exit(f"extract failed:\n{e.stderr[-3000:]}")
        ext.append(e.wall_s)
        print(
            f"repeat {i + 1}: read floor {r.wall_s:.2f} s, extract {e.wall_s:.2f} s (peak RSS {gib(e.peak_rss_bytes)})"
        )
    ratios = [e / f for e, f in zip(ext, floor, strict=True)]
    cache = "cold page cache" if args.cold else "warm page cache"
    print(
        f"\n{args.size} ({params(args.size) / 1e9:.2f} B parameters), base + {args.checkpoints} checkpoint(s), "
        f"{total / 1e9:.2f} GB of weights, {cache}, {machine()}\n"
        f"  read floor  {stats(floor)} s ({total / 1e9 / statistics.median(floor):.2f} GB/s incl. torch import)\n"
        f"  extract     {stats(ext)} s\n"
        f"  ratio       {stats(ratios)} (target ≤ 1.6)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": date.today().isoformat(),
                    "machine": machine(),
                    "size": args.size,
                    "checkpoints": args.checkpoints,
                    "bytes": total,
                    "cache": cache,
                    "command": " ".join(cmd),
                    "read_floor_s": floor,
                    "extract_s": ext,
                    "ratio_median": statistics.median(ratios),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
