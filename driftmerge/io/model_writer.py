"""Write a Hugging Face model folder tensor by tensor: safetensors shards, their index, config and tokenizer files,
and the model card. Each tensor is ``W0 + scale · drift`` (:func:`driftmerge.core.drift.moved`) or the base's own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
from safetensors.torch import save_file

from driftmerge.core.drift import moved
from driftmerge.errors import InputError
from driftmerge.hub.cards import model_card
from driftmerge.hub.refs import base_license
from driftmerge.io.checkpoints import Checkpoint, TensorInfo
from driftmerge.progress import Progress
from driftmerge.schema import DriftMeta

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


def plan_shards(names: list[str], sizes: dict[str, int], *, limit: int) -> StateDictSplit:
    """The shards, their file names and the index, by huggingface_hub's splitter (as ``save_pretrained`` writes them).

    Consecutive names, a new shard whenever the next tensor would take the current one over ``limit`` bytes; a
    tensor larger than the limit gets a shard of its own (zero-byte neighbours may join it), in file order; at least
    one shard. ``model.safetensors`` for one shard, else ``model-0000i-of-0000N.safetensors``. The splitter sees each
    size as ``min(size, limit)``: left to itself it would emit an oversized tensor's shard at once and keep the open
    shard growing past it, out of file order. ``metadata.total_size`` is the sum of the true sizes.
    """
    if limit < 1:
        raise InputError(f"the shard size limit must be at least 1 byte, got {limit}")
    split = split_state_dict_into_shards_factory(
        {n: sizes[n] for n in names},
        get_storage_size=lambda size: min(size, limit),
        filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=limit,
    )
    files = split.filename_to_tensors or {SAFETENSORS_SINGLE_FILE: []}
    return StateDictSplit(
        metadata={"total_size": sum(sizes[n] for n in names)},
        filename_to_tensors=files,
        tensor_to_filename=split.tensor_to_filename,
    )


def shard_bytes(plan: StateDictSplit, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes per shard file: the sum of its tensors' ``sizes``."""
    return {f: sum(sizes[n] for n in names) for f, names in plan.filename_to_tensors.items()}


def write_shards(
    base_ck: Checkpoint,
    deltas: dict[str, Callable[[], torch.Tensor]],
    *,
    scale: float,
    out_dtype: torch.dtype | None,
    plan: StateDictSplit,
    mine: list[str],
    tmp: Path,
    progress: Progress | None,
) -> None:
    """Compute ``W0 + scale · drift`` for the tensors of this rank's shard files ``mine`` and write each file,
    one shard in memory at a time."""
    total, done = sum(len(plan.filename_to_tensors[f]) for f in mine), 0
    for fname in mine:
        tensors: dict[str, torch.Tensor] = {}
        for name in plan.filename_to_tensors[fname]:
            w0 = base_ck.get(name)
            target_dtype = out_dtype if (out_dtype is not None and w0.dtype.is_floating_point) else w0.dtype
            source = deltas.get(name)
            tensors[name] = (
                moved(w0, source(), scale=scale, dtype=target_dtype) if source is not None else w0.to(target_dtype)
            )
            tensors[name] = tensors[name].contiguous()
            done += 1
            if progress:
                progress(done, total, name)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors


def finish_model(
    base_ck: Checkpoint,
    plan: StateDictSplit,
    *,
    tmp: Path,
    dtype: str,
    out_dtype: torch.dtype | None,
    adapter_ref: str,
    meta: DriftMeta,
    scale: float,
    step: float,
    command: str | None,
) -> None:
    """The index (``metadata.total_size`` and ``weight_map``, for several shards), config and tokenizer files, and
    the model card."""
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (tmp / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(base_ck.path, tmp, dtype if out_dtype is not None else None)
    base_info = {"ref": str(base_ck.path), "hub": base_ck.hub, "license": base_license(base_ck.path)}
    (tmp / "README.md").write_text(
        model_card(base_info, adapter_ref, adapter_meta=meta, scale=scale, step=step, command=command)
    )


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
