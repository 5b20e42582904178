"""Write a Hugging Face model folder tensor by tensor: safetensors shards, their index, config and tokenizer files,
and the model card. Each tensor is ``W0 + scale · drift`` (:func:`driftmerge.core.drift.moved`) or the base's own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from driftmerge.core.drift import moved
from driftmerge.hub.cards import model_card
from driftmerge.hub.refs import base_license
from driftmerge.io.checkpoints import Checkpoint, TensorInfo
from driftmerge.progress import Progress

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


def out_bytes(info: TensorInfo, out_dtype: torch.dtype | None) -> int:
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


def write_shards(base_ck: Checkpoint, deltas: dict[str, Callable[[], torch.Tensor]], scale: float,
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


def finish_model(base_ck: Checkpoint, shards: list[list[str]], sizes: dict[str, int], tmp: Path, dtype: str,
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
