"""Checkpoint tensors → PEFT targets through a ``meta``-device skeleton of the model and transformers' own tables.

The skeleton is built with the class ``config.json`` names in ``architectures`` (else the first Auto class that
accepts the config: causal LM, image-text-to-text, seq2seq, masked LM, bare model) on the ``meta`` device: no
memory, no weights. Each checkpoint key is renamed the way ``from_pretrained`` renames it
(``transformers.conversion_mapping.get_model_conversion_mapping`` + ``core_model_loading.rename_source_key``: e.g.
GPT-NeoX ``embed_out`` → ``lm_head``, Qwen2-VL ``model.layers`` → ``model.language_model.layers``), and keys that an
expert-fusing converter stacks (``experts.N.w1.weight`` → ``experts.gate_up_proj``) get their expert index and
rows in the fused ``(E, out, in)`` parameter. Converters other than "stack the experts, then concatenate along the
output rows" are not followed: those tensors go to the extras.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driftmerge.io.targets import Architecture, Target

AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModel",
)
# leaf names PEFT's transformers-5 MoE conversion rewrites from target_modules into expert target_parameters, on top
# of the expert converters' own source names (peft/utils/transformers_weight_conversion.py): a Linear with such a
# name is carried as a 2-D target parameter instead, which PEFT leaves alone and merges identically
_ROUTER_LEAVES = {"gate"}


def from_skeleton(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, folder: str | Path | None, trust_remote_code: bool
) -> Architecture:
    """The :class:`Architecture` of ``shapes`` (checkpoint key -> shape) for the model ``config`` describes."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = _skeleton(config, folder, trust_remote_code)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    converters, rename = _conversions(model, params)
    arch = Architecture(source="config", task_type=_task_type(type(model).__name__), model_class=type(model).__name__)
    loaded: dict[str, str] = {}  # checkpoint key -> parameter name in the loaded model
    fused_leaves: set[str] = set()
    for name, shape in shapes.items():
        new, pattern = rename(name)
        if new not in params:
            continue
        if pattern is not None:  # one slice of a fused parameter: never a tie
            conv = next(c for c in converters if pattern in c.source_patterns)
            fused_leaves.update(_leaf(p) for p in conv.source_patterns)
            target = _expert_slot(name, shape, new, pattern, conv, params[new], modules)
            if target is not None:
                arch.targets[name] = target
            continue
        loaded[name] = new
        mod_path, _, pname = new.rpartition(".")
        mod, param = modules.get(mod_path), params[new]
        if pname == "weight" and isinstance(mod, Conv1D) and len(shape) == 2:
            arch.targets[name], arch.fan_in_fan_out = Target("conv1d", mod_path), True
        elif pname == "weight" and isinstance(mod, nn.Embedding) and len(shape) == 2:
            arch.targets[name] = Target("embedding", mod_path)
        elif pname == "weight" and isinstance(mod, nn.Linear) and len(shape) == 2:
            arch.targets[name] = Target("linear", mod_path)
        elif param.dim() == 3 and len(shape) == 3 and tuple(param.shape) == tuple(shape) and not pname.endswith("bias"):
            transposed = bool(getattr(mod, "is_transposed", False))
            e, d1, d2 = shape
            arch.targets[name] = Target("experts", new, e, (d2, d1) if transposed else (d1, d2), transposed=transposed)
        elif (
            param.dim() == 2 and len(shape) == 2 and pname == "weight" and not isinstance(mod, nn.modules.conv._ConvNd)
        ):
            arch.targets[name] = Target("param", new)  # a router or other weight kept in a custom module
    if fused_leaves:  # PEFT would rewrite these Linear targets into expert parameters: carry them as parameters
        for name, t in list(arch.targets.items()):
            if t.kind == "linear" and t.path.rpartition(".")[2] in fused_leaves | _ROUTER_LEAVES:
                arch.targets[name] = Target("param", f"{t.path}.weight")
    _nest(arch, modules)
    arch.fan_in_fan_out = any(t.kind == "conv1d" for t in arch.targets.values())
    arch.tied = _tied(model, params, loaded)
    for tied in arch.tied:
        arch.targets.pop(tied, None)
    return arch


def _skeleton(config: dict[str, Any], folder: str | Path | None, trust_remote_code: bool) -> Any:
    import torch
    import transformers
    from transformers import AutoConfig

    if folder is not None and (Path(folder) / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    else:
        cfg = AutoConfig.for_model(**config)
    names = [a for a in (getattr(cfg, "architectures", None) or []) if hasattr(transformers, a)]
    with torch.device("meta"):
        if names and not getattr(cfg, "auto_map", None):
            return getattr(transformers, names[0])(cfg)
        errors = []
        for auto in AUTO_CLASSES:
            try:
                return getattr(transformers, auto).from_config(cfg, trust_remote_code=trust_remote_code)
            except (ValueError, KeyError) as exc:  # this Auto class does not take the config
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    raise ValueError(errors[-1] if errors else "no Auto class takes this config")


def _task_type(class_name: str) -> str | None:
    """PEFT's task type for a model class: CAUSAL_LM, SEQ_2_SEQ_LM, or None (a plain PeftModel)."""
    from transformers.models.auto import modeling_auto as ma

    if class_name in set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "CAUSAL_LM"
    if class_name in set(ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
        return "SEQ_2_SEQ_LM"
    return None


def _conversions(model: Any, params: dict[str, Any]) -> tuple[list[Any], Callable[[str], tuple[str, str | None]]]:
    """transformers' converters for ``model`` and ``rename(key) -> (parameter name, converter pattern or None)``,
    the way ``from_pretrained`` renames checkpoint keys. Before transformers 5 only the base-model prefix may
    differ."""
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4

        def strip_or_add(key: str) -> tuple[str, str | None]:
            if prefix and key not in params:
                if f"{prefix}.{key}" in params:
                    return f"{prefix}.{key}", None
                if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in params:
                    return key[len(prefix) + 1 :], None
            return key, None

        return [], strip_or_add
    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    return converters, lambda key: rename_source_key(key, renamings, converters, prefix, params)


def _leaf(pattern: str) -> str:
    """``.experts.*.w1.weight`` -> ``w1``: the module name a converter source pattern ends in."""
    parts = [p for p in pattern.split(".") if p and p != "weight"]
    return parts[-1] if parts else pattern


def _expert_slot(
    key: str, shape: tuple[int, ...], new: str, pattern: str, conv: Any, param: Any, modules: dict[str, Any]
) -> Target | None:
    """The expert and rows of a per-expert key inside the fused ``(E, out, in)`` stack ``new``, when the converter
    only stacks experts (``MergeModulelist(dim=0)``) and then concatenates along the rows (``Concatenate(dim=1)``)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
    if not ops or ops[0] != ("MergeModulelist", 0) or any(op != ("Concatenate", 1) for op in ops[1:]):
        return None
    if len(shape) != 2 or param.dim() != 3 or bool(getattr(modules.get(new.rpartition(".")[0]), "is_transposed", 0)):
        return None
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if match is None or not match.groups():
        return None
    e, out, inn = param.shape
    n = len(conv.source_patterns) if len(ops) > 1 else 1
    j = conv.source_patterns.index(pattern) if len(ops) > 1 else 0
    if shape[1] != inn or shape[0] * n != out:
        return None
    start = j * shape[0]
    return Target("experts", new, e, (out, inn), int(match.group(1)), (start, start + shape[0]))


def _nest(arch: Architecture, modules: dict[str, Any]) -> None:
    """Set :attr:`Target.nest` of every parameter target from the order of its module's parameters."""
    from dataclasses import replace

    paths = {t.path for t in arch.targets.values() if t.kind in ("param", "experts")}
    for name, t in list(arch.targets.items()):
        if t.kind not in ("param", "experts"):
            continue
        mod_path, _, pname = t.path.rpartition(".")
        order = [p for p in modules[mod_path]._parameters if f"{mod_path}.{p}" in paths]
        arch.targets[name] = replace(t, nest=len(order) - 1 - order.index(pname))


def _tied(model: Any, params: dict[str, Any], loaded: dict[str, str]) -> dict[str, str]:
    """Checkpoint keys whose loaded parameter is the same tensor as another key's (tied embeddings), mapped to the
    key of the parameter's own name (the first one registered, e.g. the input embedding)."""
    own = {id(p): n for n, p in model.named_parameters()}  # deduplicated: the name each shared tensor is known by
    keys_of: dict[int, list[str]] = {}
    for key, new in loaded.items():
        keys_of.setdefault(id(params[new]), []).append(key)
    tied: dict[str, str] = {}
    for ident, keys in keys_of.items():
        if len(keys) > 1:
            canonical = next((k for k in keys if loaded[k] == own.get(ident)), keys[0])
            tied.update({k: canonical for k in keys if k != canonical})
    return tied
