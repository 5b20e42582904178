"""Write a Hugging Face model folder tensor by tensor: safetensors shards, their index, the base's side files and
the model card. Each tensor is ``W0 + scale · drift`` (:func:`driftmerge.core.drift.moved`) or the base's own.

The side files (:func:`side_files`) are what the base needs beside its weights to load and serve as it did, copied
byte for byte (``config.json`` rewritten only to record ``--dtype``): its top-level files matching
:data:`driftmerge.hub.refs.SIDE_FILES` (the one list a Hub fetch also downloads: config and generation config,
tokenizer files of every kind, processor and preprocessor configs, chat templates), its ``additional_chat_templates/``
folder, and the remote code of an ``auto_map`` model. That code is the modules the ``auto_map`` entries of its
``*config.json`` side files name (``"modeling_foo.FooForCausalLM"`` → ``modeling_foo.py``; a list names a slow and a
fast tokenizer; ``"org/repo--module.Class"`` lives in another repo, nothing to copy) and, transitively, the modules
they import relatively: the files ``trust_remote_code`` loading reads (found by transformers' own
``get_relative_imports``). Other top-level ``*.py`` (training scripts, handlers) are left behind. Never copied:
weights and their index, the base's ``README.md`` (the card is written anew), anything in another folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
from safetensors.torch import save_file

from driftmerge.core.drift import moved
from driftmerge.errors import InputError
from driftmerge.hub.cards import model_card
from driftmerge.hub.refs import CHAT_TEMPLATE_DIR, SIDE_FILES, base_license
from driftmerge.io.checkpoints import Checkpoint, TensorInfo
from driftmerge.progress import Progress
from driftmerge.schema import DriftMeta


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
    """The index (``metadata.total_size`` and ``weight_map``, for several shards), the base's side files (module
    docstring) and the model card."""
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (tmp / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(base_ck.path, tmp, dtype if out_dtype is not None else None)
    base_info = {"ref": str(base_ck.path), "hub": base_ck.hub, "license": base_license(base_ck.path)}
    (tmp / "README.md").write_text(
        model_card(base_info, adapter_ref, adapter_meta=meta, scale=scale, step=step, command=command)
    )


def side_files(base: Path) -> list[str]:
    """What ``apply`` copies from the base folder, as names relative to it (module docstring): the top-level files
    matching ``SIDE_FILES`` (fnmatch, as huggingface_hub matches them), the chat templates' folder, the remote code."""
    top = sorted(p.name for p in base.iterdir() if p.is_file() and any(fnmatchcase(p.name, pat) for pat in SIDE_FILES))
    folders = [CHAT_TEMPLATE_DIR] if (base / CHAT_TEMPLATE_DIR).is_dir() else []
    return top + folders + remote_code_files(base, [n for n in top if n.endswith("config.json")])


def remote_code_files(base: Path, configs: list[str]) -> list[str]:
    """The top-level ``*.py`` that the ``auto_map`` entries of the JSON files ``configs`` in ``base`` name, and those
    they import relatively, transitively (``from .utils_foo import x`` → ``utils_foo.py``); only files present."""
    todo = sorted({m for c in configs for m in _auto_map_modules(_read_json(base / c))})
    if not todo:
        return []
    from transformers.dynamic_module_utils import get_relative_imports  # only for a remote-code model

    found: set[str] = set()
    while todo:
        module = todo.pop()
        path = base / f"{module}.py"
        if module in found or not module.isidentifier() or not path.is_file():
            continue  # ``from ..x`` or ``from .pkg.x``: not a top-level module
        found.add(module)
        todo.extend(get_relative_imports(path))
    return sorted(f"{m}.py" for m in found)


def _auto_map_modules(cfg: Any) -> Iterator[str]:
    """The modules of every ``auto_map`` in ``cfg`` (a processor's may sit inside it): ``"module.Class"``, in a
    dict by Auto class, or a list (a tokenizer's slow and fast class, null for none; the legacy tokenizer form)."""
    if isinstance(cfg, list):
        for item in cfg:
            yield from _auto_map_modules(item)
    elif isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "auto_map":
                yield from _class_modules(value)
            else:
                yield from _auto_map_modules(value)


def _class_modules(refs: Any) -> Iterator[str]:
    if isinstance(refs, dict):
        refs = list(refs.values())
    for ref in refs if isinstance(refs, list) else [refs]:
        if isinstance(ref, list):
            yield from _class_modules(ref)
        elif isinstance(ref, str) and "--" not in ref:  # "org/repo--module.Class": another repo's code
            yield ref.rpartition(".")[0]


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is unreadable (a malformed config is the base's: copied as it is)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    """Copy :func:`side_files` from ``base`` to ``out`` (the content behind a Hub cache's symlinks); with ``dtype``,
    ``config.json`` records it."""
    for name in side_files(base):
        if (base / name).is_dir():
            shutil.copytree(base / name, out / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(base / name, out / name)
    cfg_path = out / "config.json"
    if dtype is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
