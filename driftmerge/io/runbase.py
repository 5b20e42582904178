"""The base model a training run records, for ``--run-dir`` without BASE.

Where trainers write it, in the order looked at (in the run's first checkpoint, and the run folder itself):

1. ``checkpoint-N/adapter_config.json`` ``base_model_name_or_path``: PEFT writes it with every adapter checkpoint
   of a LoRA run.
2. The ``base_model`` of a model card's front matter: ``RUN/README.md``, which TRL's trainers write into
   ``output_dir`` at every save (``create_model_card``; TRL 1.16 fills ``base_model`` only when the model was
   loaded by Hub id, not from a local folder), then ``checkpoint-N/README.md`` (PEFT's adapter card).
3. ``checkpoint-N/config.json`` ``_name_or_path`` (transformers before 5 saved it; 5 no longer does).

A recorded base is taken when it is an existing local folder (a relative path is read from the current folder, as
the trainer read it) or a Hub repo id already in the local Hugging Face cache (so ``HF_HUB_OFFLINE=1`` works);
nothing is downloaded to find it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError
from driftmerge.hub.refs import card_metadata, is_repo_id
from driftmerge.io.adapter import ADAPTER_CONFIG
from driftmerge.io.rundirs import Found


@dataclass(frozen=True)
class RecordedBase:
    """A base found in a run's records: ``ref`` (a local folder or a cached Hub repo id) and ``where`` it was read."""

    ref: str
    where: str


def recorded_base(run_dir: str | Path, found: list[Found]) -> RecordedBase:
    """The base the run records (module docstring), else one :class:`InputError` line saying to give BASE."""
    run = Path(run_dir)
    recorded = _recorded(run, found[0].path if found else None)
    for ref, where in recorded:
        if _usable(ref):
            return RecordedBase(ref, where)
    if recorded:
        ref, where = recorded[0]
        raise InputError(
            f"{run}: the run records base {ref} ({where}), which is neither a local folder nor in the local Hugging "
            "Face cache; give BASE (a folder, or the Hub id to download it)"
        )
    raise InputError(
        f"{run}: the run records no base model (no adapter_config.json base_model_name_or_path, model card "
        "base_model or config.json _name_or_path); give BASE"
    )


def _recorded(run: Path, ck: Path | None) -> list[tuple[str, str]]:
    """Every (base, where) the run records, in the order of the module docstring."""

    def rel(path: Path) -> str:
        return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)

    out: list[tuple[Any, str]] = []
    if ck is not None:
        adapter = _json(ck / ADAPTER_CONFIG).get("base_model_name_or_path")
        out.append((adapter, f"{rel(ck / ADAPTER_CONFIG)} base_model_name_or_path"))
    for folder in (run, ck):
        if folder is not None:
            card = card_metadata(folder).get("base_model")
            card = card[0] if isinstance(card, list) and len(card) == 1 else card
            out.append((card, f"{rel(folder / 'README.md')} base_model"))
    if ck is not None:
        out.append((_json(ck / "config.json").get("_name_or_path"), f"{rel(ck / 'config.json')} _name_or_path"))
    return [(ref.strip(), where) for ref, where in out if isinstance(ref, str) and ref.strip()]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _usable(ref: str) -> bool:
    """An existing local folder, or a Hub repo id whose config.json is in the local cache (no network)."""
    if Path(ref).is_dir():
        return True
    if not is_repo_id(ref):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(ref, "config.json"), str)
