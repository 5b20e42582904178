"""Produce a model anywhere along the drift: ``W(scale) = W0 + scale · B A`` (``W0 + scale · D`` for extras).

``--step T`` maps to ``scale = (T - s_base) / (s_ref - s_base)``. The base streams tensor by tensor into
safetensors shards of at most ``max_shard_size`` bytes; config, generation config and tokenizer files are copied.
``format="adapter"`` writes a PEFT adapter with the scale baked into ``lora_alpha`` instead.
"""

from __future__ import annotations

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

from driftmerge.adapter import Adapter, peft_config, read_adapter, write_adapter
from driftmerge.cards import adapter_card, model_card
from driftmerge.checkpoints import Checkpoint, open_ref
from driftmerge.errors import InputError
from driftmerge.hub import base_license, resolve, resolve_recorded
from driftmerge.memory import parse_size
from driftmerge.outputs import atomic_output_dir, check_output_dir

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


def scale_for_step(step: float, meta: dict[str, Any]) -> float:
    """``scale = (T - s_base) / (s_ref - s_base)`` from the steps recorded in ``driftmerge.json``."""
    return (step - meta["base_step"]) / (meta["s_ref"] - meta["base_step"])


def step_for_scale(scale: float, meta: dict[str, Any]) -> float:
    return meta["base_step"] + scale * (meta["s_ref"] - meta["base_step"])


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
    if fmt == "adapter":
        return _write_scaled_adapter(adapter, adapter_dir, Path(out_dir), scale, step, overwrite, command)
    if fmt != "model":
        raise InputError(f"--format must be model or adapter, got {fmt!r}")
    if dtype != "auto" and dtype not in OUT_DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    shard_limit = parse_size(max_shard_size, "--max-shard-size")
    base_ck = open_base(adapter, base)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, [base_ck.path, adapter_dir], overwrite)
    out_dtype = OUT_DTYPES.get(dtype)

    deltas = delta_sources(adapter)  # tensor name -> callable giving the float32 drift
    names = list(base_ck.infos)  # file order, so shards read sequentially
    changed = written = 0
    with atomic_output_dir(out_dir, [base_ck.path, adapter_dir], overwrite) as tmp:
        writer = _ShardWriter(tmp, shard_limit)
        for done, name in enumerate(names, 1):
            w0 = base_ck.get(name)
            target_dtype = out_dtype if (out_dtype is not None and w0.dtype.is_floating_point) else w0.dtype
            source = deltas.get(name)
            if source is not None:
                w = moved(w0, source(), scale, target_dtype)
                changed += 1
            else:
                w = w0.to(target_dtype)
            writer.add(name, w)
            if progress:
                progress(done, len(names), name)
        shards, written = writer.finish()
        _copy_side_files(base_ck.path, tmp, dtype if out_dtype is not None else None)
        base_info = {"ref": str(base_ck.path), "hub": base_ck.hub, "license": base_license(base_ck.path)}
        (tmp / "README.md").write_text(model_card(base_info, adapter_ref, meta, scale, step, command))
    return ApplyResult(out_dir, scale, step, changed, len(names), shards, written)


def open_adapter(ref: str | Path) -> tuple[Path, Adapter]:
    """An adapter folder, or a Hub adapter repo fetched into the cache: (its local folder, its contents)."""
    folder = resolve(ref, "adapter").path
    return folder, read_adapter(folder)


def open_base(adapter: Adapter, base: str | Path | None = None) -> Checkpoint:
    """``base`` (a folder or Hub ref), else the base the adapter records (refetched at its commit when gone),
    checked against the adapter."""
    base_ck = open_ref(base) if base is not None else open_ref("", resolve_recorded(adapter.meta["base"]))
    check_matches_base(adapter, base_ck)
    return base_ck


def moved(w0: torch.Tensor, drift: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``W = W0 + scale · drift`` in float32, stored as ``dtype``: the one formula every writer uses."""
    return (w0.float() + scale * drift).to(dtype)


def check_matches_base(adapter: Adapter, base: Checkpoint) -> None:
    """The base must have the recorded architecture; other weights of that architecture only get a warning."""
    recorded = adapter.meta.get("base", {})
    if recorded.get("signature") and recorded["signature"] != base.signature():
        raise InputError(
            f"{base.path}: its tensors (names, shapes or dtypes) differ from those of the base this adapter was made"
            f" from ({recorded.get('ref')}); this adapter was made from another base"
        )
    if recorded.get("probe") and recorded["probe"] != base.probe():
        logger.warning(
            "%s has the architecture of the adapter's base %s but other weights; applying the drift anyway",
            base.path,
            recorded.get("ref"),
        )
    for name, rec in adapter.meta.get("tensors", {}).items():
        if rec.get("stored") not in ("lora", "extras"):
            continue
        info = base.infos.get(name)
        if info is None:
            raise InputError(f"{base.path}: has no tensor {name}; this adapter was made from another base")
        if list(info.shape) != list(rec["shape"]):
            raise InputError(
                f"{base.path}: tensor {name} has shape {list(info.shape)}, the adapter expects {rec['shape']};"
                " this adapter was made from another base"
            )


def delta_sources(adapter: Adapter) -> dict[str, Callable[[], torch.Tensor]]:
    """Tensor name -> a callable giving its float32 drift (``B A`` for LoRA modules, the extras as stored)."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name, mod in adapter.by_tensor.items():
        out[name] = mod.delta
    for name, d in adapter.extras.items():
        out[name] = lambda d=d: d
    for tied, target in (adapter.meta.get("tied") or {}).items():
        if target in out:
            out[tied] = out[target]  # tied weights move together
    return out


class _ShardWriter:
    """Accumulate tensors into shards of at most ``limit`` bytes; name them ``model-0000i-of-0000n``."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.limit:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> tuple[int, int]:
        if self.current or not self.parts:
            self._flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.folder / "model.safetensors")
            return 1, self.total
        weight_map = {}
        for i, (path, names) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n, self.total


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
