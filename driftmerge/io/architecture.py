"""Where each checkpoint tensor lives in the model as transformers loads it, and how PEFT carries its drift.

A checkpoint tensor maps to a :class:`Target`:

- ``linear`` / ``embedding`` / ``conv1d``: the weight of an ``nn.Linear`` / ``nn.Embedding`` / GPT-2 ``Conv1D``
  module (PEFT ``target_modules``);
- ``param``: a 2-D weight PEFT carries through ``target_parameters`` (MoE routers, and Linear layers whose names
  PEFT's transformers-5 MoE conversion would otherwise rewrite into expert targets);
- ``experts``: one expert's slice of a stacked ``(E, out, in)`` expert parameter (``target_parameters``), or the
  whole stack when the checkpoint stores it as one 3-D tensor.

For the common dense decoders (``DENSE_DECODERS``: every 2-D ``*.weight`` is an ``nn.Linear`` except the token
embedding, module path = tensor name) the answer comes from the names and ``config.json`` alone, without importing
transformers (seconds saved per run; tests check it against the skeleton). Every other model gets a skeleton built
on the ``meta`` device with the Auto class its config names (:mod:`driftmerge.io.skeleton`), and checkpoint keys go
through transformers' own renaming and expert-fusing tables; the answer is cached on disk for the next run
(:mod:`driftmerge.io.arch_cache`). Guessing Linear layers from names happens only when
asked (``--guess-modules``): a wrong guess must not silently become an adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError
from driftmerge.io.targets import Architecture, Target

logger = logging.getLogger("driftmerge")

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


def describe(
    config: dict[str, Any] | None,
    shapes: dict[str, tuple[int, ...]],
    *,
    folder: str | Path | None = None,
    guess: bool = False,
    trust_remote_code: bool = False,
) -> Architecture:
    """Map each checkpoint tensor of ``shapes`` to its PEFT :class:`Target` (tensors PEFT cannot carry are left out).

    ``folder`` holds ``config.json`` (needed for ``auto_map`` models, built only with ``trust_remote_code``);
    ``guess`` allows the name-based guess when no skeleton can be built.
    """
    model_type = (config or {}).get("model_type")
    if config and model_type in DENSE_DECODERS and not config.get("auto_map"):
        return _dense_decoder(config, shapes)
    if not model_type:
        if guess:
            logger.warning(
                "no config.json with a model_type: guessing module kinds from tensor names (--guess-modules)"
            )
            return _from_names(shapes)
        raise InputError(
            "no config.json with a model_type next to the base weights, so driftmerge cannot tell which tensors are "
            "Linear layers; add the model's config.json, or pass --guess-modules to guess from tensor names"
        )
    if config and config.get("auto_map") and not trust_remote_code:
        if guess:
            logger.warning(
                "%s uses custom code (auto_map): guessing module kinds from names (--guess-modules)", model_type
            )
            return _from_names(shapes)
        raise InputError(
            f"the base is a custom-code model ({model_type}, auto_map in config.json); pass --trust-remote-code to "
            "build it with its own code (it runs that code), or --guess-modules to guess Linear layers from names"
        )
    from driftmerge.io import arch_cache

    cfg = config or {}
    key = None if cfg.get("auto_map") else arch_cache.cache_key(cfg, shapes)  # custom code is never cached
    cached = arch_cache.load(key) if key else None
    if cached is not None:
        return cached
    from driftmerge.io.skeleton import from_skeleton

    try:
        arch = from_skeleton(cfg, shapes, folder=folder, trust_remote_code=trust_remote_code)
    except InputError:
        raise
    except Exception as exc:  # an architecture this transformers does not know
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if guess:
            logger.warning(
                "could not build %s from config.json (%s); guessing from names (--guess-modules)", model_type, reason
            )
            return _from_names(shapes)
        raise InputError(
            f"transformers cannot build a {model_type} model from config.json ({reason}); upgrade transformers, "
            "pass --trust-remote-code for custom-code models, or --guess-modules to guess Linear layers from names"
        ) from None
    if key:
        arch_cache.store(key, arch)
    return arch


def _from_names(shapes: dict[str, tuple[int, ...]]) -> Architecture:
    arch = Architecture(source="names")
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            kind = "embedding" if any(h in name for h in _EMBED_HINTS) else "linear"
            arch.targets[name] = Target(kind, name[: -len(".weight")])
    return arch


def _dense_decoder(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Architecture:
    arch = Architecture(source="known", model_class=(config.get("architectures") or [None])[0])
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            kind = "embedding" if name.endswith("embed_tokens.weight") else "linear"
            arch.targets[name] = Target(kind, name[: -len(".weight")])
    tie = config.get("tie_word_embeddings", DENSE_DECODERS[config["model_type"]])
    out_key, in_key = "lm_head.weight", "model.embed_tokens.weight"
    if tie and out_key in shapes and in_key in shapes:
        arch.tied = {out_key: in_key}
        del arch.targets[out_key]
    return arch
