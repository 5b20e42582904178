"""GPU: a Llama-7B-shaped bf16 base + checkpoint on local disk; whole extract vs read floor; factorization vs SVD.

    python bench/gpu_7b.py [--size 7b] [--root /tmp/driftmerge-bench] [--svd-sample 3]

1. Writes (or reuses) the run with ``common.build_run`` (rank-1 + noise deltas, bf16, one safetensors file each).
2. Times, as separate processes on warm inputs: the read floor (``import torch`` + every byte read once) and
   ``driftmerge extract --device cuda --rank 1``.
3. Factorization alone, in this process on the GPU: every drift matrix (checkpoint − base, float32) goes through
   ``driftmerge.core.lowrank.factorize`` in same-shape batches (what extract does), timed with CUDA synchronisation;
   against ``torch.linalg.svd`` (mergekit's method) on ``--svd-sample`` matrices of each shape, timed the same
   way and scaled by the count of that shape (stated as an estimate in the output).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from common import SIZES, build_run, console_script, machine, measure, params, warm
from read_limit import READ_FLOOR
from safetensors import safe_open

from driftmerge.core.lowrank import factorize, matrix_seed


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench")
    ap.add_argument("--svd-sample", type=int, default=3, help="matrices per shape for the torch.linalg.svd estimate")
    ap.add_argument("--batch-bytes", type=int, default=1 << 30, help="bytes per same-shape factorization batch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    exe = console_script()
    card = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    base, (ckpt,) = build_run(args.root, args.size, 1, device="cuda")
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s: {base.parent}", flush=True)
    warm([base, ckpt])
    files = [str(f) for d in (base, ckpt) for f in sorted(d.glob("*.safetensors"))]
    floor = measure([sys.executable, "-c", READ_FLOOR, *files])
    out = args.root / "gpu-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe or "driftmerge", "extract", str(base), str(ckpt), "-o", str(out), "--device", "cuda", "--rank", "1"]
    ext = measure(cmd)
    if ext.returncode:
        sys.exit(f"extract failed:\n{ext.stderr[-3000:]}")
    print(f"read floor {floor.wall_s:.1f} s; extract --device cuda {ext.wall_s:.1f} s", flush=True)

    dev = torch.device("cuda")
    groups: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
    with safe_open(files[0], "pt") as fb, safe_open(files[1], "pt") as fc:
        for name in fb.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name.endswith(".weight") and len(fb.get_slice(name).get_shape()) == 2:
                d = fc.get_tensor(name).to(dev).float() - fb.get_tensor(name).to(dev).float()  # (m, n)
                groups[tuple(d.shape)].append((name, d))
    fact_s, svd_est_s, svd_per_shape = 0.0, 0.0, {}
    factorize([groups[next(iter(groups))][0][1]], 1, seeds=[0])  # warm-up: CUDA context, cuSOLVER handles
    for shape, items in groups.items():
        per = max(1, args.batch_bytes // (shape[0] * shape[1] * 4))
        for i in range(0, len(items), per):
            chunk = items[i : i + per]
            seeds = [matrix_seed(0, n) for n, _ in chunk]
            dt, _ = timed(lambda chunk=chunk, seeds=seeds: factorize([m for _, m in chunk], 1, seeds=seeds))
            fact_s += dt
        times = [timed(lambda m=m: torch.linalg.svd(m, full_matrices=False))[0] for _, m in items[: args.svd_sample]]
        svd_per_shape[str(shape)] = statistics.median(times)
        svd_est_s += statistics.median(times) * len(items)
    n_mats = sum(len(v) for v in groups.values())
    result = {
        "date": date.today().isoformat(),
        "card": card,
        "machine": machine(),
        "size": args.size,
        "params": params(args.size),
        "read_floor_s": floor.wall_s,
        "extract_s": ext.wall_s,
        "extract_over_read": ext.wall_s / floor.wall_s,
        "matrices": n_mats,
        "factorize_s": fact_s,
        "svd_per_matrix_s": svd_per_shape,
        "svd_estimate_s": svd_est_s,
        "factorize_speedup": svd_est_s / fact_s,
    }
    print(
        f"\n{card}: {args.size} ({params(args.size) / 1e9:.1f} B parameters, bf16)\n"
        f"  whole extract --device cuda  {ext.wall_s:.1f} s vs read floor {floor.wall_s:.1f} s "
        f"({result['extract_over_read']:.2f}x; target <= 1.5)\n"
        f"  factorization, {n_mats} matrices  {fact_s:.2f} s (batched randomized, rank 1)\n"
        f"  torch.linalg.svd per matrix     {svd_est_s:.1f} s (estimated from {args.svd_sample} per shape: "
        f"{svd_per_shape})\n"
        f"  factorization speed-up          {result['factorize_speedup']:.0f}x (target >= 300)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
