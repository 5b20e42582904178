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
from driftmerge.schema import META, DriftMeta, TensorRecord, parse_meta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXTRAS = "drift_extras.safetensors"
CARD = "README.md"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    """One PEFT target: ``ΔW = scaling · B A``, per expert for a stacked expert parameter.

    ``kind``: ``linear`` / ``embedding`` / ``conv1d`` (a module, ``target_modules``) or ``param`` / ``experts``
    (``target_parameters``). For ``experts`` PEFT's ``lora.ParamWrapper`` layout: ``A`` is ``(E·r, in)`` expert-major
    (``A.reshape(E, r, in)[e] = A_e``) and ``B`` is ``(out, r·E)`` expert-minor (``B.reshape(out, r, E)[..., e] =
    B_e``), with ``ΔW_e = scaling · B_e A_e`` of shape ``(out, in)``.
    """

    path: str  # PEFT target: module path, or parameter path for param / experts
    kind: str
    A: torch.Tensor  # (r, in) — embeddings (r, num_embeddings); experts (E·r, in)
    B: torch.Tensor  # (out, r) — embeddings (dim, r); experts (out, r·E)
    scaling: float = 1.0  # lora_alpha / r as PEFT computes it
    experts: int = 0  # E for a stacked expert parameter
    nest: int = 0  # param / experts: `base_layer.` count in the PEFT keys (see Target.nest)

    @property
    def rank(self) -> int:
        return self.A.shape[0] // max(self.experts, 1)

    @property
    def transposed(self) -> bool:
        """Embedding and Conv1D weights are stored transposed relative to ``B A``."""
        return self.kind in ("embedding", "conv1d")

    def delta(self) -> torch.Tensor:
        """``scaling · B A`` in the weight's own layout, float32; ``(E, out, in)`` for an expert stack."""
        if self.kind == "experts":
            return torch.stack([self.expert_delta(e) for e in range(self.experts)])
        d = (self.B.float() @ self.A.float()) * self.scaling  # (out, in)
        return d.T if self.transposed else d

    def expert_delta(self, e: int) -> torch.Tensor:
        """``scaling · B_e A_e``: expert ``e``'s ``(out, in)`` drift, float32."""
        r = self.rank
        a = self.A.float().reshape(self.experts, r, -1)[e]  # (r, in)
        b = self.B.float().reshape(self.B.shape[0], r, self.experts)[:, :, e]  # (out, r)
        return (b @ a) * self.scaling


@dataclass
class LowRankExtra:
    """An extras drift too large to keep full-rank: ``D = (B A).reshape(shape)``, ``A`` ``(r, n)``, ``B`` ``(m, r)``
    for the ``(m, n) = (prod(shape[:-1]), shape[-1])`` view."""

    A: torch.Tensor
    B: torch.Tensor
    shape: tuple[int, ...]

    def delta(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()).reshape(self.shape)

    def scaled(self, s: float) -> LowRankExtra:
        return LowRankExtra(self.A, self.B * s, self.shape)


Extra = torch.Tensor | LowRankExtra


def extra_delta(x: Extra) -> torch.Tensor:
    """The float32 drift an extras entry stores."""
    return x.delta() if isinstance(x, LowRankExtra) else x.float()


def scale_extra(x: Extra, s: float) -> Extra:
    return x.scaled(s) if isinstance(x, LowRankExtra) else x * s


@dataclass
class TensorDelta:
    """One checkpoint tensor's drift, read out of its PEFT target (a slice of it for an expert stack)."""

    module: LoraModule
    record: TensorRecord

    def delta(self) -> torch.Tensor:
        rec, mod = self.record, self.module
        if mod.kind != "experts":
            return mod.delta()
        if rec.expert is not None:
            start, stop = rec.rows or (0, mod.B.shape[0])
            return mod.expert_delta(rec.expert)[start:stop]
        stack = mod.delta()  # (E, out, in)
        return stack.transpose(1, 2) if rec.transposed else stack


@dataclass
class Adapter:
    modules: dict[str, LoraModule]  # PEFT target path -> LoRA factors
    extras: dict[str, Extra]  # tensor name -> drift PEFT cannot carry (full-rank, or factored when large)
    meta: DriftMeta  # driftmerge.json
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json

    @property
    def by_tensor(self) -> dict[str, TensorDelta]:
        """Checkpoint tensor name -> its drift out of the LoRA factors."""
        return {
            name: TensorDelta(self.modules[rec.module], rec)
            for name, rec in self.meta.tensors.items()
            if rec.stored == "lora" and rec.module in self.modules
        }


def lora_keys(module: str, kind: str, *, nest: int = 0) -> tuple[str, str]:
    """On-disk PEFT keys (no adapter name) of the A and B factors of one target.

    A parameter target ``m.p`` keeps its factors on the module ``m``, behind ``nest`` times ``base_layer.``.
    """
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    if kind in ("param", "experts"):
        module = module.rpartition(".")[0] + ".base_layer" * nest
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def peft_config(
    modules: dict[str, LoraModule],
    base_ref: str | None,
    *,
    fan_in_fan_out: bool,
    task_type: str | None = "CAUSAL_LM",
    scale: float = 1.0,
) -> dict[str, Any]:
    """``adapter_config.json`` with ``lora_alpha = scale · r`` for every target (PEFT scaling = ``scale``).

    Modules go to ``target_modules``; stacked experts and other parameters to ``target_parameters`` (PEFT ≥ 0.17).
    """
    ranks = {path: m.rank for path, m in modules.items()}
    r = max(ranks.values(), default=1)
    pattern = {re.escape(p): k for p, k in sorted(ranks.items()) if k != r}
    params = sorted(p for p, m in modules.items() if m.kind in ("param", "experts"))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_ref,
        "revision": None,
        "r": r,
        "lora_alpha": _num(scale * r),
        "rank_pattern": pattern,
        "alpha_pattern": {p: _num(scale * k) for p, k in pattern.items()},
        "target_modules": sorted(p for p, m in modules.items() if m.kind not in ("param", "experts")),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if params:
        config["target_parameters"] = params
    return config


def _num(x: float) -> int | float:
    """An integral alpha as an int (as PEFT writes it), any other as a float."""
    return int(x) if float(x).is_integer() else float(x)


EXTRA_A, EXTRA_B = ".extra_A", ".extra_B"  # key suffixes of a factored extras drift


def write_adapter(
    folder: Path,
    modules: dict[str, LoraModule],
    *,
    extras: dict[str, Extra],
    meta: DriftMeta,
    config: dict[str, Any],
    card: str,
) -> None:
    """Write the adapter files into ``folder`` (which the caller made, usually a temporary one)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in sorted(modules.items()):
        key_a, key_b = lora_keys(path, m.kind, nest=m.nest)
        tensors[key_a], tensors[key_b] = m.A.contiguous(), m.B.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    stored: dict[str, torch.Tensor] = {}
    for name, x in sorted(extras.items()):
        if isinstance(x, LowRankExtra):
            stored[name + EXTRA_A], stored[name + EXTRA_B] = x.A.contiguous(), x.B.contiguous()
        else:
            stored[name] = x.contiguous()
    save_file(stored, str(folder / EXTRAS), metadata={"format": "pt"})  # one key only: metadata goes in hash order
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
        raw_extras = load_file(str(folder / EXTRAS)) if (folder / EXTRAS).is_file() else {}
    except Exception as exc:
        raise InputError(
            f"{folder}: cannot read the adapter ({str(exc).splitlines()[0]}); run driftmerge extract again"
        ) from exc
    meta = parse_meta(raw_meta, folder / META)
    modules: dict[str, LoraModule] = {}
    for rec in meta.tensors.values():
        if rec.stored != "lora" or rec.module is None or rec.module in modules:  # a lora record names its target
            continue
        path, kind, nest = rec.module, rec.kind, rec.nest or 0
        key_a, key_b = lora_keys(path, kind, nest=nest)
        if key_a not in weights or key_b not in weights:
            raise InputError(f"{folder / ADAPTER_WEIGHTS}: no factors for {path}; run driftmerge extract again")
        experts = rec.experts or 0
        r = weights[key_a].shape[0] // max(experts, 1)
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, default=config.get("lora_alpha", r))
        r_cfg = pattern_value(config.get("rank_pattern") or {}, path, default=config.get("r", r))
        if r_cfg != r:
            raise InputError(
                f"{folder}: {path} has rank {r} on disk but {r_cfg} in {ADAPTER_CONFIG}; run driftmerge extract again"
            )
        modules[path] = LoraModule(
            path, kind, weights[key_a], weights[key_b], scaling=alpha / r, experts=experts, nest=nest
        )
    extras: dict[str, Extra] = {}
    for name, rec in meta.tensors.items():
        if rec.stored != "extras":
            continue
        if name in raw_extras:
            extras[name] = raw_extras[name].float()
        elif name + EXTRA_A in raw_extras and name + EXTRA_B in raw_extras:
            extras[name] = LowRankExtra(raw_extras[name + EXTRA_A], raw_extras[name + EXTRA_B], tuple(rec.shape))
        else:
            raise InputError(f"{folder / EXTRAS}: missing the drift of {name}; run driftmerge extract again")
    return Adapter(modules=modules, extras=extras, meta=meta, config=config)


def pattern_value(pattern: dict[str, Any], path: str, *, default: Any) -> Any:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
