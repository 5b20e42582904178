"""Which module holds each weight: LoRA-able Linear / Embedding / Conv1D, and tied weights.

For the common dense decoders (``DENSE_DECODERS``: every 2-D ``*.weight`` is an ``nn.Linear`` except the token
embedding, module path = tensor name) the answer comes from the names and ``config.json`` alone, without importing
transformers (seconds saved per run; tests check it against the skeleton below). Other architectures get a model
skeleton built from ``config.json`` on the ``meta`` device (no memory, no weights), so a tensor name maps to the
module path PEFT will see and to the module's kind. Without a usable config, 2-D ``*.weight`` tensors are taken
as Linear (embeddings recognised by name) and a warning is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("driftmerge")

KINDS = ("linear", "embedding", "conv1d")
# model_type -> tie_word_embeddings default of its config class (used when config.json leaves the key out)
DENSE_DECODERS = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "gemma": True,
    "gemma2": True,
    "phi3": False,
    "olmo2": False,
    "granite": False,
}
_EMBED_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_positions", "position_embeddings")


@dataclass
class Architecture:
    kinds: dict[str, str] = field(default_factory=dict)  # tensor name -> "linear" | "embedding" | "conv1d"
    modules: dict[str, str] = field(default_factory=dict)  # tensor name -> module path in the loaded model
    tied: dict[str, str] = field(default_factory=dict)  # tensor name -> the name whose weight it shares
    fan_in_fan_out: bool = False  # True when any LoRA target is a GPT-2 style Conv1D
    source: str = "config"  # "known" (dense decoder), "config" (meta skeleton) or "names" (fallback)


def describe(config: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]]) -> Architecture:
    """Map each 2-D ``*.weight`` tensor of ``shapes`` to its module kind and path."""
    if config and config.get("model_type") in DENSE_DECODERS:
        return _dense_decoder(config, shapes)
    if config and config.get("model_type"):
        try:
            return _from_skeleton(config, shapes)
        except Exception as exc:  # an architecture transformers does not know: fall back, but say so
            logger.warning("could not build the model skeleton from config.json (%s); guessing from names", exc)
    else:
        logger.warning("no config.json with a model_type; guessing module kinds from tensor names")
    return _from_names(shapes)


def _from_names(shapes: dict[str, tuple[int, ...]]) -> Architecture:
    arch = Architecture(source="names")
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            arch.kinds[name] = "embedding" if any(h in name for h in _EMBED_HINTS) else "linear"
            arch.modules[name] = name[: -len(".weight")]
    return arch


def _dense_decoder(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Architecture:
    arch = Architecture(source="known")
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            arch.kinds[name] = "embedding" if name.endswith("embed_tokens.weight") else "linear"
            arch.modules[name] = name[: -len(".weight")]
    tie = config.get("tie_word_embeddings", DENSE_DECODERS[config["model_type"]])
    out_key, in_key = "lm_head.weight", "model.embed_tokens.weight"
    if tie and out_key in shapes and in_key in shapes:
        arch.tied = {out_key: in_key}
    return arch


def _from_skeleton(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Architecture:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    arch = Architecture(source="config")
    for name, shape in shapes.items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        path = _module_path(name[: -len(".weight")], modules, prefix)
        if path is None:
            continue
        mod = modules[path]
        if isinstance(mod, Conv1D):
            arch.kinds[name], arch.fan_in_fan_out = "conv1d", True
        elif isinstance(mod, nn.Embedding):
            arch.kinds[name] = "embedding"
        elif isinstance(mod, nn.Linear):
            arch.kinds[name] = "linear"
        else:
            continue
        arch.modules[name] = path
    arch.tied = _tied(model, shapes, modules, prefix)
    return arch


def _module_path(stem: str, modules: dict[str, Any], prefix: str) -> str | None:
    """The module path for a checkpoint key stem, allowing for a missing or extra base-model prefix."""
    for cand in (stem, f"{prefix}.{stem}" if prefix else None):
        if cand and cand in modules:
            return cand
    if prefix and stem.startswith(prefix + ".") and stem[len(prefix) + 1 :] in modules:
        return stem[len(prefix) + 1 :]
    return None


def _tied(model: Any, names: Iterable[str], modules: dict[str, Any], prefix: str) -> dict[str, str]:
    """Tensor names that share storage with another tensor name in the checkpoint (tied embeddings)."""
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return {}
    path_of = {id(m): p for p, m in modules.items()}
    names = set(names)
    out_name, in_name = f"{path_of[id(out_emb)]}.weight", f"{path_of[id(in_emb)]}.weight"

    def present(n: str) -> str | None:
        for cand in (n, n[len(prefix) + 1 :] if prefix and n.startswith(prefix + ".") else None):
            if cand and cand in names:
                return cand
        return None

    out_key, in_key = present(out_name), present(in_name)
    return {out_key: in_key} if out_key and in_key else {}
