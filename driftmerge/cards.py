"""Model cards (README.md with YAML front matter) for adapter and model folders, via huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_or_none(ref: str) -> str | None:
    """``ref`` when it reads as a Hub repo id (``org/name``) and is not a local path; else None."""
    return ref if _HUB_ID.match(ref) and not Path(ref).exists() else None


def _card(data: dict[str, Any], body: str) -> str:
    """A model card: ``data`` (``ModelCardData`` fields) as YAML front matter, then ``body``."""
    from huggingface_hub import ModelCard, ModelCardData  # imported here: it costs a quarter second at start-up

    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body}"))


def adapter_card(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    """Card for an extracted (or scaled) adapter folder."""
    base = meta["base"]["ref"]
    data = {"base_model": hub_id_or_none(base), "library_name": "peft", "tags": ["driftmerge", "lora", "rlvr"]}
    steps = ", ".join(str(c["step"]) for c in meta["checkpoints"])
    scale = meta.get("scale")
    scaled = f"\nThe scale **{scale}** is baked into `lora_alpha` and the extras.\n" if scale is not None else ""
    body = f"""# driftmerge drift adapter

The linear weight drift of an RLVR run, fitted across the base and its checkpoints and stored as a
{_rank_text(meta["rank_rule"])} LoRA adapter by [driftmerge](https://pypi.org/project/driftmerge/).
{scaled}
- base: `{base}` (step {meta["base_step"]})
- checkpoints: steps {steps}; reference step (scale 1) {meta["s_ref"]}
- fit: `{meta["fit"]}`; factorization: `{meta["svd"]}` (seed {meta["seed"]})
- LoRA modules: {summary["lora_tensors"]}, {_ranks(summary)}; drift energy kept by the factors:
  {summary["energy_kept"]:.4f}
- median linearity R²: {_fmt(summary["median_r2"])}

**PEFT sees only part of the drift.** `drift_extras.safetensors` holds the full-rank drift of
{summary["extras_tensors"]} tensors PEFT cannot scale (norms, biases, other 1-D tensors):
{100 * summary["extras_share"]:.2f} % of the drift's energy. PEFT ignores that file; `driftmerge apply` uses it.
{_tied_note(meta)}
## Use

```
driftmerge apply {{this folder}} --scale 1.5 -o extrapolated-model   # W = W0 + 1.5 · drift
```

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")  # scale 1, without the extras
```

## Made with

```
{meta.get("command") or "driftmerge (library call)"}
```
"""
    return _card(data, body)


def model_card(
    base_ref: str, adapter_ref: str, adapter_meta: dict[str, Any], scale: float, step: float, command: str | None
) -> str:
    """Card for a model written by ``driftmerge apply``."""
    data = {"base_model": hub_id_or_none(base_ref), "tags": ["driftmerge", "rlvr", "extrapolation"]}
    body = f"""# driftmerge model at scale {scale:g}

`W = W0 + {scale:g} · drift`, made by [driftmerge](https://pypi.org/project/driftmerge/) from the base
`{base_ref}` and the drift adapter `{adapter_ref}`.

- scale: {scale:g}, i.e. step {step:g} (scale 1 = the reference checkpoint at step {adapter_meta["s_ref"]})
- drift fit: `{adapter_meta["fit"]}` over steps {", ".join(str(c["step"]) for c in adapter_meta["checkpoints"])}
- rank rule: {adapter_meta["rank_rule"]}

A scale above 1 extrapolates beyond the last checkpoint: evaluate it before you rely on it.

## Made with

```
{command or "driftmerge (library call)"}
```
"""
    return _card(data, body)


def _ranks(summary: dict[str, Any]) -> str:
    lo, hi = summary["rank_min"], summary["rank_max"]
    return f"rank {lo}" if lo == hi else f"ranks {lo}–{hi}"


def _rank_text(rule: int | float) -> str:
    return f"rank-{rule}" if isinstance(rule, int) else f"low-rank (keeping {rule:.0%} of each matrix's drift energy)"


def _fmt(x: float | None) -> str:
    return "n/a (needs ≥ 2 checkpoints)" if x is None else f"{x:.4f}"


def _tied_note(meta: dict[str, Any]) -> str:
    tied = meta.get("tied") or {}
    if not tied:
        return ""
    pairs = ", ".join(f"`{a}` = `{b}`" for a, b in tied.items())
    return (
        f"\nTied weights ({pairs}): the drift is stored once, on the embedding. Merged models see it in both places;"
        " unmerged PEFT inference applies it to the input embedding only.\n"
    )
