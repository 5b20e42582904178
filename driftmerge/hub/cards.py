"""Model cards (README.md with YAML front matter) for adapter and model folders, via huggingface_hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from driftmerge.hub.refs import is_repo_id
from driftmerge.schema import DriftMeta, HubEntry, Summary

TAGS = ["driftmerge", "rlvr"]


def hub_id_or_none(ref: str) -> str | None:
    """``ref`` when it reads as a Hub repo id (:func:`~driftmerge.hub.refs.is_repo_id`) and is not a local path."""
    return ref if is_repo_id(ref) and not Path(ref).exists() else None


def card_data(base: dict[str, Any], *, library_name: str | None, tags: list[str]) -> dict[str, Any]:
    """``ModelCardData`` fields: the base's Hub id as ``base_model`` and its license, when known."""
    hub = base.get("hub") or {}
    data: dict[str, Any] = {"base_model": hub.get("repo_id") or hub_id_or_none(base.get("ref", ""))}
    if base.get("license"):
        data["license"] = base["license"]
    if library_name:
        data["library_name"] = library_name
    data["tags"] = tags
    return data


def render(data: dict[str, Any], body: str) -> str:
    """A model card: ``data`` (``ModelCardData`` fields) as YAML front matter, then ``body``."""
    from huggingface_hub import ModelCard, ModelCardData  # imported here: it costs a quarter second at start-up

    fields = {k: v for k, v in data.items() if v is not None}
    return str(ModelCard(f"---\n{ModelCardData(**fields).to_yaml()}\n---\n\n{body}"))


def _ref_text(ref: str, hub: HubEntry | None) -> str:
    """An input as a reader can find it: ``org/name@commit`` for a Hub input (``hub``), else its path."""
    return f"{hub['repo_id']}@{hub['commit'][:12]}" if hub else ref


def drift_facts(meta: DriftMeta, summary: Summary) -> str:
    """The bullet list both cards share: inputs, steps, fit, ranks, kept energy, linearity."""
    steps = ", ".join(str(c.step) for c in meta.checkpoints)
    hub_cks = [c for c in meta.checkpoints if c.hub]
    from_hub = "".join(f"\n  - step {c.step}: `{_ref_text(c.ref, c.hub)}`" for c in hub_cks)
    kept, share = f"{summary.energy_kept:.4f}", f"{100 * summary.extras_share:.2f} %"
    return f"""- base: `{_ref_text(meta.base.ref, meta.base.hub)}` (step {meta.base_step})
- checkpoints: steps {steps}; reference step (scale 1) {meta.s_ref}{from_hub}
- fit: `{meta.fit}`; factorization: `{meta.svd}` (seed {meta.seed}); rank rule: {meta.rank_rule}
- LoRA modules: {summary.lora_tensors}, {_ranks(summary)}; drift energy kept by the factors: {kept}
- linearity: median R² of the fitted line over the tensors: {_fmt(summary.median_r2)}
- outside PEFT (`drift_extras.safetensors`): {summary.extras_tensors} tensors ({extras_text(summary)}), {share}
  of the drift energy"""


def extras_text(summary: Summary) -> str:
    """What the extras hold, by kind: ``5 norm, 4 bias, 1 factored`` (or ``none``)."""
    kinds = summary.extras_kinds
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) if kinds else "none" if not summary.extras_tensors else "?"


def adapter_card(meta: DriftMeta, summary: Summary) -> str:
    """Card for an extracted (or scaled) adapter folder."""
    data = card_data(meta.base.model_dump(), library_name="peft", tags=[*TAGS, "lora"])
    scale = meta.scale
    scaled = f"\nThe scale **{scale}** is baked into `lora_alpha` and the extras.\n" if scale is not None else ""
    body = f"""# driftmerge drift adapter

The linear weight drift of an RLVR run, fitted across the base and its checkpoints and stored as a
{_rank_text(meta.rank_rule)} LoRA adapter by [driftmerge](https://pypi.org/project/driftmerge/).
{scaled}
{drift_facts(meta, summary)}

**PEFT sees only part of the drift.** `drift_extras.safetensors` holds the drift of
{summary.extras_tensors} tensors PEFT cannot carry ({extras_text(summary)}; factored ones as low-rank factors):
{100 * summary.extras_share:.2f} % of the drift's energy. PEFT ignores that file; `driftmerge apply` uses it.
{_tied_note(meta)}
## Use

```
driftmerge apply {{this folder or repo}} --scale 1.5 -o extrapolated-model   # W = W0 + 1.5 · drift
```

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")  # scale 1, without the extras
```

## Made with

```
{meta.command or "driftmerge (library call)"}
```
"""
    return render(data, body)


def model_card(
    base: dict[str, Any], adapter_ref: str, *, adapter_meta: DriftMeta, scale: float, step: float, command: str | None
) -> str:
    """Card for a model written by ``driftmerge apply``; ``base`` = {"ref", "hub", "license"} of the base used."""
    data = card_data(base, library_name=None, tags=[*TAGS, "extrapolation"])
    body = f"""# driftmerge model at scale {scale:g}

`W = W0 + {scale:g} · drift`, made by [driftmerge](https://pypi.org/project/driftmerge/) from the base
`{_ref_text(base["ref"], base.get("hub"))}` and the drift adapter `{adapter_ref}`.

- scale: **{scale:g}**, i.e. step {step:g} (scale 1 = the reference checkpoint at step {adapter_meta.s_ref})
{drift_facts(adapter_meta, adapter_meta.summary)}

A scale above 1 extrapolates beyond the last checkpoint: evaluate it before you rely on it.

## Made with

```
{command or "driftmerge (library call)"}
```
"""
    return render(data, body)


def analysis_section(report: dict[str, Any], figures: list[str]) -> str:
    """A card section from a ``driftmerge analyze`` report (``report.json``) and its figures' repo paths."""
    model = report.get("model") or {}
    rows = [
        ("pooled R² of the line", model.get("r2")),
        ("median per-element R²", model.get("elem_r2_median")),
        ("share of elements with R² above the threshold", model.get("elem_r2_share_above")),
        ("rank-1 share of the drift energy", model.get("energy_rank1")),
    ]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)
    pics = "\n\n".join(f"![{Path(f).stem}]({f})" for f in figures)
    return f"""
## Analysis (`driftmerge analyze`)

| whole model | value |
|---|---|
{table}

{pics}
"""


def _ranks(summary: Summary) -> str:
    lo, hi = summary.rank_min, summary.rank_max
    return f"rank {lo}" if lo == hi else f"ranks {lo}–{hi}"


def _rank_text(rule: int | float) -> str:
    return f"rank-{rule}" if isinstance(rule, int) else f"low-rank (keeping {rule:.0%} of each matrix's drift energy)"


def _fmt(x: float | None) -> str:
    return "n/a (needs ≥ 2 checkpoints)" if x is None else f"{x:.4f}"


def _tied_note(meta: DriftMeta) -> str:
    tied = meta.tied
    if not tied:
        return ""
    pairs = ", ".join(f"`{a}` = `{b}`" for a, b in tied.items())
    return (
        f"\nTied weights ({pairs}): the drift is stored once, on the embedding. Merged models see it in both places;"
        " unmerged PEFT inference applies it to the input embedding only.\n"
    )
