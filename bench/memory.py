"""Peak RSS of ``driftmerge extract`` for 1, 3 and 6 checkpoints and two model sizes: it should stay flat.

    python bench/memory.py [--sizes 0.1b,0.4b] [--checkpoints 1,3,6] [--max-memory 1GiB,256MiB]

Every combination runs once as its own process (whole-process peak RSS from ``wait4``) on warm inputs. The
budget bounds read-ahead plus drift matrices awaiting factorization; on top of it come the Python + torch runtime
and a few float32 copies of the largest tensor (the base, one delta per checkpoint while it is fitted, the
fit's running sums), so peak RSS should depend on the budget and the largest tensor, not on the model's size
or the number of checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

from common import SIZES, build_run, console_script, gib, llama_shapes, machine, measure, params, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1b,0.4b")
    ap.add_argument("--checkpoints", default="1,3,6")
    ap.add_argument("--max-memory", default="1GiB,256MiB", help="budgets to try (driftmerge --max-memory)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = console_script()
    if not exe:
        sys.exit("the driftmerge console script is not on PATH: pip install -e .")
    sizes = args.sizes.split(",")
    counts = [int(x) for x in args.checkpoints.split(",")]
    budgets = args.max_memory.split(",")
    rows = []
    out = args.root / "memory-out"
    for size in sizes:
        if size not in SIZES:
            sys.exit(f"unknown size {size}; choose from {', '.join(SIZES)}")
        largest = max(math.prod(s) for s in llama_shapes(*SIZES[size]).values())
        for n in counts:
            base, cks = build_run(args.root, size, n)
            warm([base, *cks])
            for budget in budgets:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [exe, "extract", str(base), *map(str, cks), "-o", str(out), "--max-memory", budget]
                r = measure(cmd)
                if r.returncode:
                    sys.exit(f"extract failed:\n{r.stderr[-3000:]}")
                rows.append(
                    {
                        "size": size,
                        "params": params(size),
                        "largest_tensor_f32_bytes": largest * 4,
                        "checkpoints": n,
                        "max_memory": budget,
                        "peak_rss_bytes": r.peak_rss_bytes,
                        "wall_s": r.wall_s,
                    }
                )
                print(
                    f"{size:5s} ({params(size) / 1e9:.2f} B) {n} ckpt  --max-memory {budget:7s} "
                    f"peak RSS {gib(r.peak_rss_bytes)}  {r.wall_s:6.2f} s",
                    flush=True,
                )
    print(f"\n{machine()}")
    print("| size | checkpoints | --max-memory | peak RSS | wall |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} ({r['params'] / 1e9:.2f} B) | {r['checkpoints']} | {r['max_memory']} | "
            f"{gib(r['peak_rss_bytes'])} | {r['wall_s']:.1f} s |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"date": date.today().isoformat(), "machine": machine(), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
