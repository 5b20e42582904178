"""Checkpoints of a run trained with LoRA: PEFT adapter folders (``adapter_model.safetensors`` +
``adapter_config.json``), read as the updates they apply to the base.

A LoRA module's update at one checkpoint is ``ΔW = s · B A`` (transposed for embeddings and fan_in_fan_out
Conv1D), ``s = lora_alpha / r`` (``/ √r`` with rsLoRA), with PEFT's ``rank_pattern`` / ``alpha_pattern`` per
module; :meth:`LoraCheckpoint.update` gives ``(s · B, A)`` in PEFT's orientation, never the dense product.
``modules_to_save`` copies are whole weights; trainable tokens (``trainable_token_indices``) are new values of
some embedding rows. ``base_layer`` copies that PEFT saves with embedding targets are the frozen base and are
ignored. DoRA and non-LoRA adapters are refused in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from driftmerge.errors import InputError
from driftmerge.hub.refs import resolve
from driftmerge.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, pattern_value
from driftmerge.io.checkpoints import MODEL_WEIGHTS, Checkpoint, open_ref, resolve_steps

_LORA = {".lora_A.weight": "linear", ".lora_embedding_A": "embedding"}
_TOKENS = ".token_adapter.trainable_tokens_delta"


def is_adapter_checkpoint(path: str | Path) -> bool:
    """A folder with PEFT adapter weights and no full model weights."""
    p = Path(path)
    return (p / ADAPTER_WEIGHTS).is_file() and not any((p / w).is_file() for w in MODEL_WEIGHTS)


class LoraCheckpoint:
    """One checkpoint of a LoRA-trained run (module docstring). ``path``, ``hub`` and ``label`` as
    :class:`~driftmerge.io.checkpoints.Checkpoint` has them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hub: dict[str, Any] | None = None
        self.label = str(self.path)
        cfg_path = self.path / ADAPTER_CONFIG
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{cfg_path}: cannot read the adapter config ({exc}); save the checkpoint again") from exc
        if self.config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{self.path}: a {self.config.get('peft_type')} adapter; driftmerge reads LoRA runs only")
        if self.config.get("use_dora"):
            raise InputError(f"{self.path}: a DoRA adapter (its update is not B A); driftmerge reads plain LoRA runs")
        try:  # one handle for every read (a memory map: the file is not read here)
            self._file = safe_open(str(self.path / ADAPTER_WEIGHTS), "pt")
            self.keys = [k.removeprefix(PEFT_PREFIX) for k in self._file.keys()]  # noqa: SIM118 (no __iter__)
        except Exception as exc:
            raise InputError(
                f"{self.path / ADAPTER_WEIGHTS}: cannot read the adapter ({str(exc).splitlines()[0]}); copy it again"
            ) from exc
        self.modules: dict[str, str] = {}  # module path -> "linear" | "embedding"
        self.saved: list[str] = []  # parameter paths of modules_to_save copies
        self.tokens: list[str] = []  # embedding module paths with trainable tokens
        for key in self.keys:
            kind = next((k for s, k in _LORA.items() if key.endswith(s)), None)
            if kind is not None:
                self.modules[key[: -len(next(s for s in _LORA if key.endswith(s)))]] = kind
            elif key.endswith(_TOKENS):
                self.tokens.append(key[: -len(_TOKENS)])
            elif ".lora_" not in key and ".base_layer." not in key:
                self.saved.append(key)

    @property
    def base_ref(self) -> str | None:
        """The base the adapter was trained on, as PEFT recorded it."""
        return self.config.get("base_model_name_or_path")

    @property
    def weight_bytes(self) -> int:
        return (self.path / ADAPTER_WEIGHTS).stat().st_size

    def _read(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(PEFT_PREFIX + key)

    def update(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s · B, A)`` float32 of one LoRA module: its update is ``s B A`` in PEFT's orientation."""
        if self.modules[module] == "embedding":
            a, b = self._read(f"{module}.lora_embedding_A"), self._read(f"{module}.lora_embedding_B")
        else:
            a, b = self._read(f"{module}.lora_A.weight"), self._read(f"{module}.lora_B.weight")
        r = pattern_value(self.config.get("rank_pattern") or {}, module, default=self.config.get("r", a.shape[0]))
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, default=self.config.get("lora_alpha", r))
        s = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return b.float() * s, a.float()  # (out, r), (r, in)

    def saved_weight(self, key: str) -> torch.Tensor:
        """A ``modules_to_save`` copy: the whole trained parameter."""
        return self._read(key)

    def token_rows(self, module: str) -> tuple[list[int], torch.Tensor]:
        """Trainable tokens of embedding ``module``: the row indices and their trained values ``(k, dim)``."""
        indices = self.config.get("trainable_token_indices")
        if isinstance(indices, dict):
            indices = next((v for k, v in indices.items() if module == k or module.endswith("." + k)), None)
        if not isinstance(indices, list):
            raise InputError(f"{self.path}: trainable tokens of {module} without their indices in {ADAPTER_CONFIG}")
        return [int(i) for i in indices], self._read(module + _TOKENS)


def open_lora_run(
    base: str | Path, checkpoints: Sequence[str | Path], *, steps: Sequence[int] | None, base_step: int
) -> tuple[Checkpoint, list[LoraCheckpoint], list[int], str]:
    """:func:`open_run` for a run trained with LoRA: the checkpoints are PEFT adapter folders."""
    base_ck = open_ref(base)
    cks = []
    for p in checkpoints:
        r = resolve(p, "adapter")
        ck = LoraCheckpoint(r.path)
        ck.hub, ck.label = r.hub, r.label
        cks.append(ck)
    found, order, source = resolve_steps([c.label for c in cks], steps, base_step=base_step)
    return base_ck, [cks[i] for i in order], found, source


def is_lora_run(checkpoints: Sequence[str | Path]) -> bool:
    """Are these (local) checkpoints PEFT adapter folders? All or none: a mix is refused in one line."""
    kinds = [is_adapter_checkpoint(p) for p in checkpoints]
    if any(kinds) and not all(kinds):
        lora = next(p for p, k in zip(checkpoints, kinds, strict=True) if k)
        full = next(p for p, k in zip(checkpoints, kinds, strict=True) if not k)
        raise InputError(
            f"{lora} is a LoRA adapter checkpoint but {full} is not; give the checkpoints of one run (all full "
            "models, or all adapters)"
        )
    return bool(kinds) and all(kinds)


def lora_plan(
    base: Checkpoint, cks: Sequence[LoraCheckpoint], *, targets: dict[str, Any]
) -> dict[str, tuple[str, str]]:
    """Base tensor name -> how the run changes it: ``("lora", module)``, ``("saved", key)`` (a modules_to_save
    copy) or ``("tokens", module)`` (trainable tokens). ``targets``: the base's tensor name -> PEFT target
    (:class:`~driftmerge.io.targets.Target`). Every checkpoint must train the same modules."""
    by_module = {t.path: n for n, t in targets.items() if t.kind in ("linear", "embedding", "conv1d")}

    def tensor_of(module: str, key: str | None = None) -> str:
        name = key if key is not None and key in base.infos else by_module.get(module)
        if name is None:
            raise InputError(f"{cks[0].path}: trains {key or module}, which the base {base.path} does not have")
        return name

    plan: dict[str, tuple[str, str]] = {}
    for module in cks[0].modules:
        plan[tensor_of(module)] = ("lora", module)
    for key in cks[0].saved:
        plan[tensor_of(key.rpartition(".")[0] if key.endswith(".weight") else key, key)] = ("saved", key)
    for module in cks[0].tokens:
        plan[tensor_of(module)] = ("tokens", module)
    for ck in cks[1:]:
        if (ck.modules, ck.saved, ck.tokens) != (cks[0].modules, cks[0].saved, cks[0].tokens):
            raise InputError(f"{ck.path} trains other modules than {cks[0].path}; give the checkpoints of one LoRA run")
    return plan


def dense_weight(ck: LoraCheckpoint, how: tuple[str, str], *, w0: torch.Tensor) -> torch.Tensor:
    """The whole trained weight (float32, on ``w0``'s device) of a ``saved`` or ``tokens`` entry of
    :func:`lora_plan`, given the base weight ``w0``."""
    kind, what = how
    if kind == "saved":
        w = ck.saved_weight(what).to(w0.device).float()
    else:
        idx, rows = ck.token_rows(what)
        w = w0.clone()
        w[idx] = rows.to(w0.device).float()  # (k, dim) rows replaced
    if w.shape != w0.shape:
        raise InputError(f"{ck.path}: {what} has shape {list(w.shape)}, the base {list(w0.shape)}")
    return w
