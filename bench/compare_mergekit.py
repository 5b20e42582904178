"""driftmerge extract vs mergekit-extract-lora on the same Llama-shaped bf16 base + checkpoint, side by side.

    python bench/compare_mergekit.py [--size 0.4b 0.4b-wide] [--pairs 3] [--mergekit PATH] [--json out.json]

mergekit is not a driftmerge dependency: install it where you like (``pip install mergekit``, a venv is kindest)
and pass the path of its ``mergekit-extract-lora`` if it is not on PATH. The two tools run alternately on the
same inputs, with the page cache warm for both, each as its own process: wall time and peak RSS are whole-process
figures (``wait4``). Both factorize every 2-D weight at rank 1 (mergekit with ``--embed-lora``, so the embeddings
are decomposed too, as driftmerge does; without it mergekit copies them whole instead).

Agreement, per matrix, of the two rank-1 products ``P`` against the true delta ``D`` (checkpoint − base, float32):
``|cos(P_driftmerge, P_mergekit)|`` and the kept energy ``‖P‖² / ‖D‖²`` of each. Each ``--size`` is measured in
turn (one untimed driftmerge run first, so its bytecode is cached as on an installed machine); the JSON holds a list
of one result per size.
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

import torch
from common import SIZES, build_run, console_script, gib, machine, measure, params, stats, warm
from safetensors import safe_open
from safetensors.torch import load_file

from driftmerge.io.adapter import read_adapter


def mergekit_products(folder: Path) -> dict[str, torch.Tensor]:
    """Weight-shaped rank-r products ``B A`` from a mergekit LoRA folder, by checkpoint tensor name."""
    sd = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    out = {}
    for key, a in sd.items():
        prefix = "base_model.model."
        if ".lora_A." in key:  # Linear: (r, in), (out, r)
            stem = key[len(prefix) : key.index(".lora_A.")]
            b = sd[key.replace(".lora_A.", ".lora_B.")]
            out[f"{stem}.weight"] = b.float() @ a.float()
        elif key.endswith(".lora_embedding_A"):  # Embedding: (r, vocab), (dim, r); weight delta is (B A)ᵀ
            stem = key[len(prefix) : -len(".lora_embedding_A")]
            b = sd[key.replace("lora_embedding_A", "lora_embedding_B")]
            out[f"{stem}.weight"] = (b.float() @ a.float()).T
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k: v * scale for k, v in out.items()}


def agreement(base: Path, ckpt: Path, ours: Path, theirs: Path) -> dict[str, float]:
    mine = {n: m.delta() for n, m in read_adapter(ours).by_tensor.items()}
    other = mergekit_products(theirs)
    common = sorted(set(mine) & set(other))
    if not common:
        raise SystemExit("the two adapters share no matrix; check the mergekit run")
    cos, e_ours, e_theirs, gaps = [], [], [], []
    with safe_open(str(base / "model.safetensors"), "pt") as fb, safe_open(str(ckpt / "model.safetensors"), "pt") as fc:
        for name in common:
            d = fc.get_tensor(name).float() - fb.get_tensor(name).float()  # the true delta
            p, q = mine[name], other[name]
            p64, q64 = p.double().flatten(), q.double().flatten()
            cos.append(abs(float(p64 @ q64 / (p64.norm() * q64.norm()))))
            total = float(d.pow(2).sum())
            e_ours.append(float(p.pow(2).sum()) / total)
            e_theirs.append(float(q.pow(2).sum()) / total)
            gaps.append(abs(e_ours[-1] - e_theirs[-1]))
    return {
        "matrices": len(common),
        "only_driftmerge": len(set(mine) - set(other)),
        "only_mergekit": len(set(other) - set(mine)),
        "cos_min": min(cos),
        "cos_median": statistics.median(cos),
        "energy_driftmerge_median": statistics.median(e_ours),
        "energy_mergekit_median": statistics.median(e_theirs),
        "energy_gap_max": max(gaps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["0.4b", "0.4b-wide"])
    ap.add_argument("--pairs", type=int, default=3, help="alternating driftmerge/mergekit pairs")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"), help="mergekit-extract-lora")
    ap.add_argument("--driftmerge", default=console_script(), help="the driftmerge console script")
    ap.add_argument("--no-embed-lora", action="store_true", help="let mergekit copy embeddings whole")
    ap.add_argument("--extra", default="", help="extra driftmerge extract arguments, e.g. '--factor-dtype bfloat16'")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not args.mergekit or not Path(args.mergekit).exists():
        sys.exit("mergekit-extract-lora not found: pip install mergekit (a venv is fine) and pass --mergekit PATH")
    if not args.driftmerge:
        sys.exit("the driftmerge console script is not on PATH: pip install -e .")
    results = [compare(size, args) for size in args.size]
    print(f"\n{machine()}, {date.today()}, {args.pairs} alternating pairs per size")
    for r in results:
        print(
            f"{r['size']} ({r['params'] / 1e9:.2f} B parameters, bf16)\n"
            f"  driftmerge   {stats(r['driftmerge_s'])} s, peak RSS {gib(r['driftmerge_peak_rss'])}\n"
            f"  mergekit     {stats(r['mergekit_s'])} s, peak RSS {gib(r['mergekit_peak_rss'])}\n"
            f"  speed-up     median {r['ratio_median']:.1f}, min {r['ratio_min']:.1f}, max {r['ratio_max']:.1f} x "
            "(mergekit time / driftmerge time, per pair)\n"
            f"  agreement    {r['matrices']} matrices: |cos| min {r['cos_min']:.6f}, "
            f"median {r['cos_median']:.6f}; kept energy median {r['energy_driftmerge_median']:.4f} vs "
            f"{r['energy_mergekit_median']:.4f}, largest gap {r['energy_gap_max']:.2e}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def compare(size: str, args: argparse.Namespace) -> dict:
    """``args.pairs`` alternating runs of both tools on the ``size`` model, and their agreement."""
    base, (ckpt,) = build_run(args.root, size, 1)
    warm([base, ckpt])
    work = args.root / "compare-out"
    work.mkdir(parents=True, exist_ok=True)
    ours, theirs = work / "driftmerge", work / "mergekit"
    dm_cmd = [args.driftmerge, "extract", str(base), str(ckpt), "-o", str(ours), "--rank", "1", *args.extra.split()]
    mk_cmd = [args.mergekit, "--model", str(ckpt), "--base-model", str(base), "--out-path", str(theirs)]
    mk_cmd += ["--max-rank", "1"] + ([] if args.no_embed_lora else ["--embed-lora"])
    env = {"HF_HUB_OFFLINE": "1"}  # mergekit's card step asks the Hub about local paths otherwise

    shutil.rmtree(ours, ignore_errors=True)
    measure(dm_cmd, env)  # untimed: bytecode cached, as after an install
    runs: dict[str, list] = {"driftmerge": [], "mergekit": []}
    for i in range(args.pairs):
        for tool, cmd, out in (("driftmerge", dm_cmd, ours), ("mergekit", mk_cmd, theirs)):
            shutil.rmtree(out, ignore_errors=True)
            r = measure(cmd, env)
            if r.returncode != 0 or not (out / "adapter_model.safetensors").exists():
                sys.exit(f"{tool} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            runs[tool].append(r)
            print(f"{size} pair {i + 1}: {tool:10s} {r.wall_s:7.2f} s  peak RSS {gib(r.peak_rss_bytes)}", flush=True)

    ratios = [m.wall_s / d.wall_s for d, m in zip(runs["driftmerge"], runs["mergekit"], strict=True)]
    return {
        "date": date.today().isoformat(),
        "machine": machine(),
        "size": size,
        "params": params(size),
        "driftmerge_cmd": " ".join(dm_cmd),
        "mergekit_cmd": " ".join(mk_cmd),
        "driftmerge_s": [r.wall_s for r in runs["driftmerge"]],
        "mergekit_s": [r.wall_s for r in runs["mergekit"]],
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "driftmerge_peak_rss": max(r.peak_rss_bytes for r in runs["driftmerge"]),
        "mergekit_peak_rss": max(r.peak_rss_bytes for r in runs["mergekit"]),
        **agreement(base, ckpt, ours, theirs),
    }


if __name__ == "__main__":
    main()
