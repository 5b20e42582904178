"""Shared benchmark pieces: a Llama-shaped bf16 run written straight with safetensors, and measured subprocesses.

The run is ``base/`` plus ``checkpoint-<100 k>/`` for k = 1..N. Every 2-D weight drifts along a planted rank-1
direction (its share of the drift energy is ``RANK1_SHARE``), linearly in the step, plus fresh Gaussian noise per
checkpoint; 1-D weights drift by small noise. Folders are cached under a key of the shape, the count and the seed,
so reruns reuse them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SIZES = {  # name: (hidden, intermediate, layers, vocab) — Llama-shaped, untied embeddings
    "0.1b": (768, 2048, 8, 32000),
    "0.4b": (1024, 4096, 20, 32000),
    "0.4b-wide": (1536, 4096, 12, 32000),  # wider, fewer layers: 0.44 B
    "1b": (2048, 5632, 16, 32000),
    "7b": (4096, 11008, 32, 32000),
}
WEIGHT_STD = 0.02
DRIFT_RMS = 1e-3  # RMS of the last checkpoint's drift per element
RANK1_SHARE = 0.6  # share of the drift energy on the planted rank-1 direction; the rest is noise


def params(size: str) -> int:
    return sum(_numel(s) for s in llama_shapes(*SIZES[size]).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{n}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    heads = max(hidden // 128, 1)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def build_run(
    root: Path, size: str, checkpoints: int = 1, seed: int = 0, device: str = "cpu"
) -> tuple[Path, list[Path]]:
    """Write (or reuse) ``root/<size>-n<checkpoints>-s<seed>/{base, checkpoint-*}``; return the folders.

    Random numbers are drawn on ``device`` (``cuda`` makes a 7B run in a minute; its numbers differ from the CPU's).
    Only the base and one checkpoint are in memory at a time; the planted direction is kept as its two factors.
    """
    dims = SIZES[size]
    run = root / f"{size}-n{checkpoints}-s{seed}"
    base, cks = run / "base", [run / f"checkpoint-{100 * k}" for k in range(1, checkpoints + 1)]
    if (run / "complete").exists():
        return base, cks
    shapes, config = llama_shapes(*dims), llama_config(*dims)
    g = torch.Generator(device).manual_seed(seed)
    base_sd: dict[str, torch.Tensor] = {}
    planted: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, shape in shapes.items():
        base_sd[name] = (torch.randn(shape, generator=g, device=device) * WEIGHT_STD).to(torch.bfloat16).cpu()
        planted[name] = _planted_factors(shape, g, device)
    _save(base, base_sd, config)
    noise_std = DRIFT_RMS * (1 - RANK1_SHARE) ** 0.5
    for k, ck in enumerate(cks, 1):
        frac = k / checkpoints
        sd = {}
        for name, w in base_sd.items():
            drift = planted[name][0] if len(planted[name]) == 1 else planted[name][0] @ planted[name][1]  # (m, n)
            d = drift * frac + torch.randn(w.shape, generator=g, device=device) * (noise_std * frac)
            sd[name] = (w.to(device).float() + d).to(torch.bfloat16).cpu()
        _save(ck, sd, config)
        del sd
    (run / "complete").write_text("ok\n")
    return base, cks


def _planted_factors(shape: tuple[int, ...], g: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    """The rank-1 part of the last checkpoint's drift, ``u vᵀ`` with RMS ``DRIFT_RMS · √RANK1_SHARE``, as
    ``(u, v)``; a 1-D weight gets a dense ``(drift,)``."""
    rms = DRIFT_RMS * RANK1_SHARE**0.5
    if len(shape) == 1:
        return (torch.randn(shape, generator=g, device=device) * rms,)
    u = torch.randn(shape[0], 1, generator=g, device=device)  # (m, 1)
    v = torch.randn(1, shape[1], generator=g, device=device)  # (1, n)
    scale = rms / (u.pow(2).mean().sqrt() * v.pow(2).mean().sqrt())  # RMS of u vᵀ is RMS(u) · RMS(v)
    return (u * scale, v)


def _save(folder: Path, sd: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    stderr: str


# Runs the command as a grandchild and reports its peak RSS. Linux carries the pre-exec memory of a forked process
# into ru_maxrss, so a child forked straight from this (large, torch-holding) process would report at least this
# process's size; forking from a fresh small interpreter keeps the figure the command's own.
_PEAK_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\n@@peak_rss_kib {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def console_script(name: str = "driftmerge") -> str | None:
    """The console script ``name`` installed beside this Python (not a shell shim such as pyenv's, whose own start-up
    would be timed too), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Run ``cmd`` to completion; its wall time and its own peak RSS (``wait4`` in a small wrapper process).

    ``PYTHONDONTWRITEBYTECODE`` is dropped from the environment, as on a user's machine: an editable install then
    compiles its modules once and later runs read the cached bytecode (with it set, every run compiles them
    again, 0.1 s of driftmerge's start-up here)."""
    t0 = time.perf_counter()
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_WRAPPER, *cmd],
        env={**base_env, **(env or {})},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    err, _, tail = proc.stderr.rpartition("\n@@peak_rss_kib ")
    rss = int(tail.split()[0]) * 1024 if tail.strip() else 0  # Linux reports KiB
    return Run(wall, rss, proc.returncode, err)


def warm(paths: list[Path]) -> None:
    """Read every file once so the page cache holds it and every timed run sees the same storage state."""
    for p in paths:
        for f in sorted(p.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cpus} cores, {mem:.0f} GiB, torch {torch.__version__}"


def stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f}, min {min(xs):.2f}, max {max(xs):.2f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
