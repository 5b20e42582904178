"""Produce a model anywhere along the drift: ``W(scale) = W0 + scale · B A`` (``W0 + scale · D`` for extras).

``--step T`` maps to ``scale = (T - s_base) / (s_ref - s_base)``. The base streams tensor by tensor into
safetensors shards of at most ``max_shard_size`` bytes; config, generation config and tokenizer files are copied.
``format="adapter"`` writes a PEFT adapter with the scale baked into ``lora_alpha`` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from driftmerge.commands.distributed import distributed
from driftmerge.core.drift import moved, scale_for_step, step_for_scale
from driftmerge.errors import InputError
from driftmerge.hub.cards import adapter_card, model_card
from driftmerge.hub.refs import base_license
from driftmerge.io.adapter import Adapter, peft_config, write_adapter
from driftmerge.io.checkpoints import Checkpoint, TensorInfo
from driftmerge.io.memory import parse_size
from driftmerge.io.outputs import atomic_output_dir, check_output_dir
from driftmerge.io.sources import delta_sources, open_adapter, open_base

logger = logging.getLogger("driftmerge")

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ApplyResult:
    out_dir: Path
    scale: float
    step: float
    tensors_changed: int
    tensors_total: int
    shards: int
    bytes_written: int


def apply_drift(
    adapter_dir: str | Path,
    out_dir: str | Path,
    scale: float | None = None,
    step: float | None = None,
    base: str | Path | None = None,
    fmt: str = "model",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> ApplyResult:
    """Write the model (or scaled adapter) at ``scale`` (or at step ``step``) along the drift."""
    if (scale is None) == (step is None):
        raise InputError("give exactly one of --scale or --step")
    adapter_ref = str(adapter_dir)
    adapter_dir, adapter = open_adapter(adapter_dir)
    meta = adapter.meta
    if step is not None:
        scale = scale_for_step(step, meta)
    assert scale is not None
    if not math.isfinite(scale):
        raise InputError(f"the scale must be a finite number, got {scale}")
    step = step_for_scale(scale, meta)
    if fmt == "adapter":  # a small folder: rank 0 writes it
        with distributed(cuda=False) as dist:
            done = dist.run(lambda: _write_scaled_adapter(adapter, adapter_dir, Path(out_dir), scale, step, overwrite,
                                                          command) if dist.is_main else None)  # fmt: skip
            return dist.broadcast(done)
    if fmt != "model":
        raise InputError(f"--format must be model or adapter, got {fmt!r}")
    if dtype != "auto" and dtype not in OUT_DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    shard_limit = parse_size(max_shard_size, "--max-shard-size")
    with distributed(cuda=False) as dist, contextlib.ExitStack() as stack:
        base_ck = dist.run(lambda: _open_checked(adapter, adapter_dir, base, Path(out_dir), overwrite))
        out_dtype = OUT_DTYPES.get(dtype)
        names = list(base_ck.infos)  # file order, so shards read sequentially
        sizes = {n: _out_bytes(base_ck.infos[n], out_dtype) for n in names}
        shards = plan_shards(names, sizes, shard_limit)
        tmp = None
        if dist.is_main:
            tmp = stack.enter_context(atomic_output_dir(Path(out_dir), [base_ck.path, adapter_dir], overwrite))
        tmp = dist.broadcast(tmp)
        ids = [str(i) for i in range(len(shards))]
        mine = dist.share(ids, {i: sum(sizes[n] for n in shards[int(i)]) for i in ids})
        deltas = delta_sources(adapter)  # tensor name -> callable giving the float32 drift
        dist.run(lambda: _write_shards(base_ck, deltas, scale, out_dtype, shards, [int(i) for i in mine], tmp,
                                       progress))  # fmt: skip
        if dist.is_main:
            dist.run(lambda: _finish_model(base_ck, shards, sizes, tmp, dtype, out_dtype, adapter_ref, meta, scale,
                                           step, command))  # fmt: skip
        else:
            dist.agree(None)
        changed = sum(1 for n in names if n in deltas)
        written = sum(sizes.values())
    return ApplyResult(Path(out_dir), scale, step, changed, len(names), len(shards), written)


def _open_checked(adapter: Adapter, adapter_dir: Path, base: str | Path | None, out_dir: Path,
                  overwrite: bool) -> Checkpoint:  # fmt: skip
    base_ck = open_base(adapter, base)
    check_output_dir(out_dir, [base_ck.path, adapter_dir], overwrite)
    return base_ck


def _out_bytes(info: TensorInfo, out_dtype: torch.dtype | None) -> int:
    dt = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
    return info.numel * dt.itemsize


def plan_shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive names, a new shard whenever the next tensor would take the current one over ``limit`` bytes
    (one tensor larger than the limit gets a shard of its own); at least one shard."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in names:
        if current and current_bytes + sizes[name] > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += sizes[name]
    if current or not shards:
        shards.append(current)
    return shards


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_shards(base_ck: Checkpoint, deltas: dict[str, Callable[[], torch.Tensor]], scale: float,
                  out_dtype: torch.dtype | None, shards: list[list[str]], mine: list[int], tmp: Path,
                  progress: Progress | None) -> None:  # fmt: skip
    """Compute ``W0 + scale · drift`` for the tensors of this rank's shards and write each shard."""
    total, done = sum(len(shards[i]) for i in mine), 0
    for i in mine:
        tensors: dict[str, torch.Tensor] = {}
        for name in shards[i]:
            w0 = base_ck.get(name)
            target_dtype = out_dtype if (out_dtype is not None and w0.dtype.is_floating_point) else w0.dtype
            source = deltas.get(name)
            tensors[name] = moved(w0, source(), scale, target_dtype) if source is not None else w0.to(target_dtype)
            tensors[name] = tensors[name].contiguous()
            done += 1
            if progress:
                progress(done, total, name)
        save_file(tensors, str(tmp / shard_name(i, len(shards))), metadata={"format": "pt"})
        del tensors


def _finish_model(base_ck: Checkpoint, shards: list[list[str]], sizes: dict[str, int], tmp: Path, dtype: str,
                  out_dtype: torch.dtype | None, adapter_ref: str, meta: dict[str, Any], scale: float, step: float,
                  command: str | None) -> None:  # fmt: skip
    """The index (for several shards), config and tokenizer files, and the model card."""
    n = len(shards)
    if n > 1:
        weight_map = {name: shard_name(i, n) for i, names in enumerate(shards) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(base_ck.path, tmp, dtype if out_dtype is not None else None)
    base_info = {"ref": str(base_ck.path), "hub": base_ck.hub, "license": base_license(base_ck.path)}
    (tmp / "README.md").write_text(model_card(base_info, adapter_ref, meta, scale, step, command))


def _copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    for fname in COPIED_FILES:
        if (base / fname).is_file():
            shutil.copyfile(base / fname, out / fname)
    cfg_path = out / "config.json"
    if dtype is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _write_scaled_adapter(
    adapter: Adapter,
    adapter_dir: Path,
    out_dir: Path,
    scale: float,
    step: float,
    overwrite: bool,
    cmd: str | None,
) -> ApplyResult:
    """PEFT adapter with ``lora_alpha = scale · r`` per module and extras multiplied by ``scale``."""
    meta = {**adapter.meta, "scale": scale, "scaled_from": str(adapter_dir.absolute()), "command": cmd}
    if any(abs(m.scaling - 1.0) > 1e-12 for m in adapter.modules.values()):
        raise InputError(f"{adapter_dir}: already a scaled adapter; scale the original adapter instead")
    config = peft_config(
        adapter.modules,
        adapter.config.get("base_model_name_or_path", ""),
        bool(adapter.meta["fan_in_fan_out"]),
        scale,
    )
    extras = {k: v * scale for k, v in adapter.extras.items()}
    with atomic_output_dir(out_dir, [adapter_dir], overwrite) as tmp:
        write_adapter(tmp, adapter.modules, extras, meta, config, adapter_card(meta, meta["summary"]))
        written = sum(f.stat().st_size for f in tmp.iterdir())
    n = len(adapter.modules) + len(extras)
    return ApplyResult(out_dir, scale, step, n, n, 1, written)
