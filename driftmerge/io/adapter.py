"""The adapter folder (docs/design.md §3.1): PEFT LoRA files + full-rank extras + driftmerge metadata; write and read.

PEFT applies ``ΔW = (lora_alpha / r) · B A`` (transposed for embeddings and fan_in_fan_out Conv1D). driftmerge
writes ``lora_alpha = r`` per module (through ``alpha_pattern`` where the rank differs), so PEFT's scaling is 1;
a scaled adapter (``apply --format adapter``) bakes the scale into the alphas instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from driftmerge.errors import InputError
from driftmerge.schema import META, DriftMeta, parse_meta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXTRAS = "drift_extras.safetensors"
CARD = "README.md"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    """One LoRA-carrying module: ``delta(weight) = scaling · B A`` (transposed when ``transposed``)."""

    tensor: str  # checkpoint tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    kind: str  # "linear" | "embedding" | "conv1d"
    A: torch.Tensor  # (r, in) — for embeddings (r, num_embeddings)
    B: torch.Tensor  # (out, r) — for embeddings (dim, r)
    scaling: float = 1.0  # lora_alpha / r as PEFT computes it

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def transposed(self) -> bool:
        """Embedding and Conv1D weights are stored transposed relative to ``B A``."""
        return self.kind in ("embedding", "conv1d")

    def delta(self) -> torch.Tensor:
        """``scaling · B A`` in the weight's own layout, float32."""
        d = (self.B.float() @ self.A.float()) * self.scaling  # (out, in)
        return d.T if self.transposed else d


@dataclass
class Adapter:
    modules: dict[str, LoraModule]  # module path -> LoRA factors
    extras: dict[str, torch.Tensor]  # tensor name -> full-rank drift (float32)
    meta: DriftMeta  # driftmerge.json
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json

    @property
    def by_tensor(self) -> dict[str, LoraModule]:
        return {m.tensor: m for m in self.modules.values()}


def lora_keys(module: str, kind: str) -> tuple[str, str]:
    """On-disk PEFT keys (no adapter name) of the A and B factors of one module."""
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def peft_config(
    modules: dict[str, LoraModule], base_ref: str, *, fan_in_fan_out: bool, scale: float = 1.0
) -> dict[str, Any]:
    """``adapter_config.json`` with ``lora_alpha = scale · r`` for every module (PEFT scaling = ``scale``)."""
    ranks = {path: m.rank for path, m in modules.items()}
    r = max(ranks.values(), default=1)
    pattern = {re.escape(p): k for p, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "revision": None,
        "r": r,
        "lora_alpha": _num(scale * r),
        "rank_pattern": pattern,
        "alpha_pattern": {p: _num(scale * k) for p, k in pattern.items()},
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _num(x: float) -> int | float:
    """An integral alpha as an int (as PEFT writes it), any other as a float."""
    return int(x) if float(x).is_integer() else float(x)


def write_adapter(
    folder: Path,
    modules: dict[str, LoraModule],
    *,
    extras: dict[str, torch.Tensor],
    meta: DriftMeta,
    config: dict[str, Any],
    card: str,
) -> None:
    """Write the adapter files into ``folder`` (which the caller made, usually a temporary one)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in sorted(modules.items()):
        key_a, key_b = lora_keys(path, m.kind)
        tensors[key_a], tensors[key_b] = m.A.contiguous(), m.B.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    save_file(
        {k: v.contiguous() for k, v in sorted(extras.items())},
        str(folder / EXTRAS),
        metadata={"format": "pt"},  # one key only: safetensors writes metadata in hash order
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / META).write_text(meta.to_json())
    (folder / CARD).write_text(card)


def read_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder written by driftmerge; clear errors for anything missing or inconsistent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such adapter folder (run `driftmerge extract` first, or name the folder)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, META):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: missing {name}; not a driftmerge adapter folder (run driftmerge extract)")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        raw_meta = json.loads((folder / META).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
        extras = load_file(str(folder / EXTRAS)) if (folder / EXTRAS).is_file() else {}
    except Exception as exc:
        raise InputError(
            f"{folder}: cannot read the adapter ({str(exc).splitlines()[0]}); run driftmerge extract again"
        ) from exc
    meta = parse_meta(raw_meta, folder / META)
    modules: dict[str, LoraModule] = {}
    for name, rec in meta.tensors.items():
        if rec.stored != "lora" or rec.module is None:  # a lora record always names its module
            continue
        path, kind = rec.module, rec.kind
        key_a, key_b = lora_keys(path, kind)
        if key_a not in weights or key_b not in weights:
            raise InputError(f"{folder / ADAPTER_WEIGHTS}: no factors for {path}; run driftmerge extract again")
        r = weights[key_a].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", r))
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", r))
        if r_cfg != r:
            raise InputError(
                f"{folder}: {path} has rank {r} on disk but {r_cfg} in {ADAPTER_CONFIG}; run driftmerge extract again"
            )
        modules[path] = LoraModule(name, kind, weights[key_a], weights[key_b], scaling=alpha / r)
    for name, rec in meta.tensors.items():
        if rec.stored == "extras" and name not in extras:
            raise InputError(f"{folder / EXTRAS}: missing the drift of {name}; run driftmerge extract again")
    return Adapter(modules=modules, extras={k: v.float() for k, v in extras.items()}, meta=meta, config=config)


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
