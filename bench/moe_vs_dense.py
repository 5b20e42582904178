"""Extraction time of a small Mixtral-shaped MoE against a dense Llama of the same bytes, side by side.

    python bench/moe_vs_dense.py [--repeats 3] [--json out.json]

Both models: hidden 512, 4 layers, 8 heads / 2 KV heads (head_dim 64), vocab 8192, untied, bf16. The MoE has 8
experts of intermediate 1024 (router top-2); the dense Llama's intermediate is chosen so its bf16 bytes match the
MoE's (8·1024 = 8192: the same MLP weights in one matrix per projection instead of eight), ≈ 123 MB each.
Each gets a base and checkpoints at steps 100, 200 with a planted drift, written by ``save_pretrained``
(``moe_sizes.planted_run``; the MoE on disk has per-expert ``experts.N.w1/w2/w3`` keys).

Timed, alternating MoE and dense, ``--repeats`` times each, on warm inputs at ``--rank 1``:

- ``cli``: the whole ``driftmerge extract`` process (Python start-up and imports included). The dense Llama is
  mapped from names alone; the MoE's first run imports transformers and builds a meta skeleton, whose answer
  later runs read from driftmerge's architecture cache (``DRIFTMERGE_CACHE``, here a folder of the bench's own).
  ``cli (first run)`` is one run per model with that cache emptied before it;
- ``library``: ``driftmerge.commands.extract.extract`` in this process after one untimed warm-up call each, with the
  pass over the tensors and the factorization time from driftmerge's own log line. This process has already
  imported transformers' Mixtral and Llama code to build the inputs, so the library figure leaves that one-time
  import out and the CLI figure keeps it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from common import console_script, machine, measure, warm
from moe_sizes import adapter_sizes, checkpoint_shapes, planted_run, saved_shapes, tensor_bytes

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, EXPERTS, EXPERT_MLP = 512, 4, 8, 2, 8192, 8, 1024
_SHARED = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
}
MOE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    **_SHARED,
    "intermediate_size": EXPERT_MLP,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": 2,
}


def dense_config(target_bytes: int) -> dict:
    """A Llama with the MoE's hidden, layers, heads and vocab whose intermediate (a multiple of 128) brings its
    bf16 bytes nearest ``target_bytes``."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_SHARED, "intermediate_size": 128}
    rest = 2 * sum(math.prod(s) for s in checkpoint_shapes(config).values()) - 2 * LAYERS * 3 * HIDDEN * 128
    per_128 = 2 * LAYERS * 3 * HIDDEN * 128  # bytes of 128 more intermediate rows in every layer's 3 projections
    config["intermediate_size"] = 128 * max(1, round((target_bytes - rest) / per_128))
    return config


def build(config: dict, root: Path) -> tuple[Path, list[Path]]:
    """The base and two checkpoints of ``config`` under ``root`` (reused when complete)."""
    done = root / "complete"
    if done.exists() and json.loads(done.read_text()) == config:
        return root / "base", [root / "checkpoint-100", root / "checkpoint-200"]
    shutil.rmtree(root, ignore_errors=True)
    base, cks = planted_run(config, root)
    done.write_text(json.dumps(config))
    return base, cks


class _PassLog(logging.Handler):
    """Keeps extract's "pass over N tensors: S s …" and "factorization: F s in all …" log figures: (S, F)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pass_s: float | None = None
        self.last: tuple[float, float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = tuple(record.args or ())
        if str(record.msg).startswith("pass over"):
            self.pass_s = float(args[1])
        elif str(record.msg).startswith("factorization:") and self.pass_s is not None:
            self.last = (self.pass_s, float(args[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench" / "moe-vs-dense")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = console_script()
    if not exe:
        sys.exit("the driftmerge console script is not on PATH: pip install -e .")
    from transformers.utils import logging as hf_logging

    from driftmerge.commands.extract import extract
    from driftmerge.commands.options import ExtractOptions
    from driftmerge.io.adapter import ADAPTER_WEIGHTS, EXTRAS

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    moe_bytes = 2 * sum(math.prod(s) for s in checkpoint_shapes(MOE).values())
    models = {"MoE (Mixtral)": MOE, "dense (Llama)": dense_config(moe_bytes)}
    runs = {name: build(cfg, args.root / name.split()[0]) for name, cfg in models.items()}
    for base, cks in runs.values():
        warm([base, *cks])
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)

    log = _PassLog()
    dm_logger = logging.getLogger("driftmerge")
    dm_logger.addHandler(log)
    dm_logger.setLevel(logging.INFO)
    out = args.root / "out"
    cache = args.root / "cache"
    env = {"DRIFTMERGE_CACHE": str(cache)}
    os.environ.update(env)  # the library calls below use the same cache
    first: dict[str, float] = {}
    for name, (base, cks) in runs.items():  # each model's first run: no cached architecture
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [exe, "extract", str(base), *map(str, cks), "-o", str(out), "--rank", "1", "--overwrite"]
        measure(cmd, env)  # untimed: bytecode cached, as after an install
        shutil.rmtree(cache, ignore_errors=True)
        first[name] = measure(cmd, env).wall_s
        print(f"{name:14s} first run (no cached architecture): cli {first[name]:.2f} s", flush=True)
    cli: dict[str, list[float]] = {n: [] for n in models}
    rss: dict[str, list[int]] = {n: [] for n in models}
    lib: dict[str, list[float]] = {n: [] for n in models}
    passes: dict[str, list[tuple]] = {n: [] for n in models}
    for base, cks in runs.values():  # warm-up
        extract(base, cks, out_dir=out, options=ExtractOptions(rank=1), overwrite=True)
    for i in range(args.repeats):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            base, cks = runs[name]
            cmd = [exe, "extract", str(base), *map(str, cks), "-o", str(out), "--rank", "1", "--overwrite"]
            r = measure(cmd, env)
            if r.returncode:
                sys.exit(f"extract failed:\n{r.stderr[-3000:]}")
            cli[name].append(r.wall_s)
            rss[name].append(r.peak_rss_bytes)
            t = time.perf_counter()
            extract(base, cks, out_dir=out, options=ExtractOptions(rank=1), overwrite=True)
            lib[name].append(time.perf_counter() - t)
            passes[name].append(log.last or ())
            print(f"{name:14s} run {i + 1}: cli {cli[name][-1]:.2f} s, library {lib[name][-1]:.2f} s", flush=True)

    rows = []
    for name, cfg in models.items():
        base, cks = runs[name]
        shapes = saved_shapes(base)
        sizes = adapter_sizes(cfg, shapes, 1)
        extract(base, cks, out_dir=out, options=ExtractOptions(rank=1), overwrite=True)
        p = [x for x in passes[name] if x]
        rows.append(
            {
                "model": name,
                "intermediate_size": cfg["intermediate_size"],
                "keys": len(shapes),
                "factorized": sizes.factorized,
                "base_bytes": 2 * sum(math.prod(s) for s in shapes.values()),
                "input_bytes": sum(f.stat().st_size for d in (base, *cks) for f in d.glob("*.safetensors")),
                "adapter_bytes": tensor_bytes(out / ADAPTER_WEIGHTS) + tensor_bytes(out / EXTRAS),
                "cli_first_s": first[name],
                "cli_s": cli[name],
                "library_s": lib[name],
                "pass_s": [x[0] for x in p],
                "factorize_s": [x[1] for x in p],
                "peak_rss_bytes": rss[name],
            }
        )

    med = statistics.median
    print(f"\n{machine()}, {date.today()}, rank 1, median of {args.repeats}")
    print(
        "| model | intermediate | checkpoint keys | matrices factorized | bf16 base | input (base + 2) "
        "| adapter + extras | CLI wall (first run) | CLI wall | library | pass / factorization (worker s) "
        "| peak RSS (CLI) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pf = f"{med(r['pass_s']):.2f} / {med(r['factorize_s']):.2f} s" if r["pass_s"] else "-"
        print(
            f"| {r['model']} | {r['intermediate_size']} | {r['keys']} | {r['factorized']} | "
            f"{r['base_bytes'] / 1e6:.1f} MB | {r['input_bytes'] / 1e6:.1f} MB | {r['adapter_bytes'] / 1e6:.2f} MB | "
            f"{r['cli_first_s']:.2f} s | {med(r['cli_s']):.2f} s | {med(r['library_s']):.2f} s | {pf} | "
            f"{max(r['peak_rss_bytes']) / 2**30:.2f} GiB |"
        )
    moe, dense = rows
    ratio_cli = med(moe["cli_s"]) / med(dense["cli_s"])
    ratio_first = moe["cli_first_s"] / dense["cli_first_s"]
    ratio_lib = med(moe["library_s"]) / med(dense["library_s"])
    print(
        f"\nbytes MoE / dense: {moe['base_bytes'] / dense['base_bytes']:.3f}; "
        f"time MoE / dense: CLI ×{ratio_cli:.2f} (first run ×{ratio_first:.2f}), library ×{ratio_lib:.2f}"
    )
    print(f"{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
