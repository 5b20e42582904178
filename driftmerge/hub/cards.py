"""Model cards (README.md with YAML front matter) for adapter and model folders, via huggingface_hub.

A card names no local path: an input from the Hub (or from the Hugging Face cache) by ``org/name@commit``, a local
folder by its name, the command with each absolute path cut to its last part (``driftmerge.json`` keeps the paths
and the command as typed). The YAML ``base_model`` is the base's Hub id whenever one is known: ``--base-model``, the
base's Hub origin, or the cache folder it lies in.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from driftmerge import __version__
from driftmerge.hub.refs import cache_origin, is_repo_id
from driftmerge.schema import DriftMeta, HubEntry, Summary

TAGS = ["driftmerge", "rlvr"]
OLD_PLACEHOLDER = "{this folder or repo}"  # in the usage of adapter cards from driftmerge 0.1.0 and before


def hub_id_or_none(ref: str) -> str | None:
    """``ref`` when it reads as a Hub repo id (:func:`~driftmerge.hub.refs.is_repo_id`) and is not a local path."""
    return ref if not Path(ref).exists() and is_repo_id(ref) else None  # a local path costs no repo-id check


def base_hub_id(base: dict[str, Any]) -> str | None:
    """The Hub repo id of a base ``{"ref", "hub", "repo_id"?}`` (a ``BaseRecord`` dumped, or the base ``apply``
    used): ``repo_id`` (``--base-model``), else its Hub origin's, else that of the cache snapshot ``ref`` lies in,
    else ``ref`` itself when it reads as a repo id; None for a local folder of unknown origin."""
    ref = base.get("ref", "")
    hub = base.get("hub") or (cache_origin(ref) if ref else None) or {}
    return base.get("repo_id") or hub.get("repo_id") or hub_id_or_none(ref)


def card_data(
    base: dict[str, Any], *, library_name: str | None, tags: list[str], base_model: str | None = None
) -> dict[str, Any]:
    """``ModelCardData`` fields: ``base_model`` (given, else :func:`base_hub_id`) and the base's license, when known."""
    data: dict[str, Any] = {"base_model": base_model or base_hub_id(base)}
    if base.get("license"):
        data["license"] = base["license"]
    if library_name:
        data["library_name"] = library_name
    data["tags"] = tags
    return data


def render(data: dict[str, Any], body: str) -> str:
    """A model card: ``data`` (``ModelCardData`` fields) as YAML front matter, then ``body`` — the text
    ``str(ModelCard(...))`` gives for it; ``huggingface_hub.repocard_data`` alone imports in 50 ms, where
    ``ModelCard`` brings the whole Hub client (0.25 s, a tenth of a small extract)."""
    from huggingface_hub.repocard_data import ModelCardData

    fields = {k: v for k, v in data.items() if v is not None}
    return f"---\n{ModelCardData(**fields).to_yaml()}\n---\n\n{body}"


def _ref_text(ref: str, hub: HubEntry | None) -> str:
    """An input as a reader can find it: ``org/name@commit`` for a Hub input (``hub``), a Hub id as given, else the
    name of its local folder (never its path)."""
    if hub:
        return f"{hub['repo_id']}@{hub['commit'][:12]}"
    return hub_id_or_none(ref) or Path(ref).name or ref


def _base_text(base: dict[str, Any], hub_id: str | None) -> str:
    """The base in a card: its Hub origin (:func:`_ref_text`), else its Hub id and local folder, else its folder."""
    if base.get("hub"):
        return f"`{_ref_text(base['ref'], base['hub'])}`"
    folder = _ref_text(base["ref"], None)
    if hub_id is None:
        return f"the local folder `{folder}`"
    return f"`{hub_id}`" if folder == hub_id else f"`{hub_id}`, from the local folder `{folder}`"


def portable_command(command: str) -> str:
    """``command`` with each absolute path cut to its last part (``/home/me/run/checkpoint-100`` →
    ``checkpoint-100``, also after ``--flag=``): what a card shows; ``driftmerge.json`` keeps it as typed."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: not a command line driftmerge wrote
        return command
    out = []
    for word in words:
        flag, eq, value = word.partition("=") if word.startswith("--") and "=" in word else ("", "", word)
        if os.path.isabs(value) and Path(value).name:
            value = Path(value).name
        out.append(flag + eq + value)
    return shlex.join(out)


def drift_facts(meta: DriftMeta, summary: Summary, *, hub_id: str | None = None) -> str:
    """The bullet list both cards share: inputs, steps, fit, ranks, kept energy, linearity; ``hub_id``: the base's
    Hub id when not :func:`base_hub_id`'s."""
    steps = ", ".join(str(c.step) for c in meta.checkpoints)
    hub_cks = [c for c in meta.checkpoints if c.hub]
    from_hub = "".join(f"\n  - step {c.step}: `{_ref_text(c.ref, c.hub)}`" for c in hub_cks)
    kept, share = f"{summary.energy_kept:.4f}", f"{100 * summary.extras_share:.2f} %"
    base = _base_text(meta.base.model_dump(), hub_id or base_hub_id(meta.base.model_dump()))
    return f"""- base: {base} (step {meta.base_step})
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


def adapter_card(meta: DriftMeta, summary: Summary, *, where: str | None = None, base_model: str | None = None) -> str:
    """Card for an extracted (or scaled) adapter folder. ``where``: how its usage names the adapter (the folder's
    name, or the repo it is pushed to); ``base_model``: the base's Hub id when not the one ``meta`` gives."""
    base = meta.base.model_dump()
    data = card_data(base, library_name="peft", tags=[*TAGS, "lora"], base_model=base_model)
    scale = meta.scale
    scaled = f"\nThe scale **{scale}** is baked into `lora_alpha` and the extras.\n" if scale is not None else ""
    body = f"""# driftmerge drift adapter

The linear weight drift of an RLVR run, fitted across the base and its checkpoints and stored as a
{_rank_text(meta.rank_rule)} LoRA adapter by driftmerge {meta.driftmerge_version}.
{scaled}
{drift_facts(meta, summary, hub_id=data["base_model"])}

**PEFT sees only part of the drift.** `drift_extras.safetensors` holds the drift of
{summary.extras_tensors} tensors PEFT cannot carry ({extras_text(summary)}; factored ones as low-rank factors):
{100 * summary.extras_share:.2f} % of the drift's energy. PEFT ignores that file; `driftmerge apply` uses it.
{_tied_note(meta)}
{_usage(meta, base, data["base_model"], where or "path/to/this/adapter")}
## Made with

```
{_command_text(meta.command)}
```
"""
    return render(data, body)


def _usage(meta: DriftMeta, base: dict[str, Any], hub_id: str | None, where: str) -> str:
    """The card's ``## Use``: ``driftmerge apply`` (not for a scaled adapter: apply scales the original) and PEFT;
    for a base of unknown Hub id, where each finds it."""
    apply = (
        f"\n```\ndriftmerge apply {where} --scale 1.5 -o extrapolated-model   # W = W0 + 1.5 · drift\n```\n"
        if meta.scale is None
        else ""
    )
    if hub_id is None:
        folder = _ref_text(base["ref"], None)
        loaded = f"the base (the local folder `{folder}`), loaded with transformers"
        note = (
            f"\nThe base was the local folder `{folder}`, of no known Hub id, so `adapter_config.json` names none\n"
            "(`base_model_name_or_path: null`). `driftmerge apply` finds it through `driftmerge.json` where the\n"
            "adapter was made; elsewhere give it `--base BASE_FOLDER`. To name the base's Hub id, push with\n"
            "`--base-model ORG/NAME`.\n"
        )
    else:
        loaded, note = f"{hub_id}, loaded with transformers", ""
    return f"""## Use
{apply}
```python
from peft import PeftModel
# base_model: {loaded}
model = PeftModel.from_pretrained(base_model, "{where}")  # scale {meta.scale or 1:g}, without the extras
```
{note}"""


def _command_text(command: str | None) -> str:
    return portable_command(command) if command else "driftmerge (library call)"


def model_card(
    base: dict[str, Any], adapter_ref: str, *, adapter_meta: DriftMeta, scale: float, step: float, command: str | None
) -> str:
    """Card for a model written by ``driftmerge apply``; ``base`` = {"ref", "hub", "license"} of the base used. Its
    Hub id is :func:`base_hub_id`'s, else the adapter's for the base the adapter records (``--base-model``)."""
    recorded = adapter_meta.base
    same = Path(base["ref"]).absolute() == Path(recorded.ref).absolute()
    hub_id = base_hub_id(base) or (recorded.hub_id if same else None)
    data = card_data(base, library_name=None, tags=[*TAGS, "extrapolation"], base_model=hub_id)
    body = f"""# driftmerge model at scale {scale:g}

`W = W0 + {scale:g} · drift`, made by driftmerge {__version__} from the base
{_base_text(base, hub_id)} and the drift adapter `{_ref_text(adapter_ref, None)}`.

- scale: **{scale:g}**, i.e. step {step:g} (scale 1 = the reference checkpoint at step {adapter_meta.s_ref})
{drift_facts(adapter_meta, adapter_meta.summary, hub_id=hub_id if same else None)}

A scale above 1 extrapolates beyond the last checkpoint: evaluate it before you rely on it.

## Made with

```
{_command_text(command)}
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
