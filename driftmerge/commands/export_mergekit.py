"""Export the drift as a mergekit config whose ``mergekit-yaml`` run rebuilds ``driftmerge apply --scale S``.

mergekit's ``task_arithmetic`` (0.1.5) computes, per tensor, ``W = W0 + λ · Σ_i w_i (W_i − W0)`` (divided by
``Σ w_i`` when ``normalize`` is true). The config writes ``normalize: false`` and ``lambda: 1.0`` out (they are
mergekit's defaults for task_arithmetic), and ``dtype: float32`` so the arithmetic runs in float32 like ``apply``;
``out_dtype`` is the storage dtype (the base's unless told otherwise).

Two ways to express ``W0 + S · drift`` as such a merge:

- ``via="checkpoints"``: the lsq drift is a fixed linear combination of the checkpoint deltas,
  ``D = t_ref Σ t_i D_i / Σ t_i²``, so ``W0 + S D = W0 + Σ w_i (W_i − W0)`` with ``w_i = S t_ref t_i / Σ t_j²``;
  the endpoint drift is ``D_N`` (``w_N = S``). The merge is what ``apply`` gives from a *full-rank* adapter, extras
  included; a rank-r adapter gives its rank-r approximation. A pca drift is no fixed combination: refused.
- ``via="lora"``: mergekit's ``BASE+ADAPTER`` reference merges the PEFT adapter into the base (PEFT
  ``merge_and_unload``: ``W0 + B A``), and weight ``S`` on it gives ``W0 + S B A``, the LoRA part of ``apply``.
  The extras (norms, biases in ``drift_extras.safetensors``) are not in the PEFT adapter, so they stay at ``W0``.

Everything here but :func:`export_mergekit` (read the adapter, check, write one file) is free of I/O.
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from driftmerge import __version__
from driftmerge.commands.options import ApplyOptions
from driftmerge.core.devices import DTYPES
from driftmerge.core.drift import scale_and_step
from driftmerge.errors import InputError, OutputError
from driftmerge.hub.cards import extras_text
from driftmerge.io.adapter import Adapter
from driftmerge.io.checkpoints import Checkpoint, check_compatible
from driftmerge.io.outputs import check_output_file, write_text_atomic
from driftmerge.io.sources import check_matches_base, open_adapter
from driftmerge.schema import DriftMeta

VIAS = ("checkpoints", "lora")
DEFAULT_OUTPUT = "driftmerge-mergekit.yaml"
LORA_CACHE = "mergekit-lora-cache"  # mergekit needs a folder to keep the base+adapter merge in


@dataclass
class ExportResult:
    out_file: Path
    via: str
    scale: float
    step: float
    models: list[tuple[str, float]]  # (model reference as written, weight)
    notes: list[str]  # what the merge reproduces and what it leaves out
    run: str  # the mergekit command to run


def checkpoint_weights(meta: DriftMeta, scale: float) -> list[float]:
    """Task-arithmetic weights ``w_i`` of the recorded checkpoints so that ``Σ w_i (W_i − W0) = scale · D``.

    ``lsq``: ``D = t_ref Σ t_i D_i / Σ t_j²`` with ``t_i = s_i − s_base`` and ``t_ref = s_ref − s_base``, hence
    ``w_i = scale · t_ref · t_i / Σ t_j²`` (one checkpoint: ``w_1 = scale``). ``endpoint``: ``D = D_N``, hence
    ``w_N = scale`` and 0 elsewhere. An adapter already scaled by ``apply --format adapter`` carries its scale
    ``c`` in ``meta.scale`` and ``apply`` from it moves ``scale · c · D``: ``c`` multiplies every weight.
    """
    fit = meta.fit
    steps = [c.step for c in meta.checkpoints]
    s = scale * (meta.scale if meta.scale is not None else 1.0)
    if fit == "endpoint":
        return [0.0] * (len(steps) - 1) + [s]
    if fit != "lsq":
        raise InputError(
            f"the {fit} fit is no fixed combination of the checkpoints, so a checkpoint merge cannot reproduce it;"
            " pass --via lora to merge the adapter itself"
        )
    t = [x - meta.base_step for x in steps]
    t_ref = meta.s_ref - meta.base_step
    sq = sum(x * x for x in t)
    return [s * t_ref * x / sq for x in t]


def model_ref(path: str, lora: str | None = None) -> str | dict[str, Any]:
    """mergekit's ``PATH`` / ``PATH+LORA`` string; the mapping form where a path holds ``+`` or ``@`` (which
    mergekit's string form would split into an adapter or a revision)."""
    paths = [path] if lora is None else [path, lora]
    if not any(c in p for p in paths for c in "+@"):
        return "+".join(paths)
    ref: dict[str, Any] = {"model": {"path": path}}
    if lora is not None:
        ref["lora"] = {"path": lora}
    return ref


def build_config(
    meta: DriftMeta, scale: float, *, via: str, adapter_dir: str, base: str, out_dtype: str
) -> dict[str, Any]:
    """The mergekit config (its ``MergeConfiguration`` schema) for ``W0 + scale · drift``; paths absolute."""
    if via == "checkpoints":
        weights = checkpoint_weights(meta, scale)
        refs = [c.ref for c in meta.checkpoints]
        models = [(model_ref(r), w) for r, w in zip(refs, weights, strict=True) if w != 0.0]
    elif via == "lora":
        models = [(model_ref(base, adapter_dir), scale)]
    else:
        raise InputError(f"--via must be one of {', '.join(VIAS)}, got {via!r}")
    return {
        "merge_method": "task_arithmetic",
        "base_model": model_ref(base),
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in models],
        "parameters": {"normalize": False, "lambda": 1.0},  # W = W0 + Σ w_i (W_i − W0), no rescaling
        "dtype": "float32",  # arithmetic dtype, as in apply
        "out_dtype": out_dtype,  # storage dtype of the written model
    }


def fidelity_notes(meta: DriftMeta, via: str) -> list[str]:
    """What the merge reproduces of ``apply`` from this adapter, and what it does not (one sentence each)."""
    summary = meta.summary
    if via == "checkpoints":
        notes = [
            f"W0 + scale · D with the full {meta.fit} drift D, norms and biases included: what apply gives from a"
            " full-rank adapter"
        ]
        energy, r_min, r_max = summary.energy_kept, summary.rank_min, summary.rank_max
        if energy < 1.0 - 1e-6:
            ranks = f"rank {r_min}" if r_min == r_max else f"ranks {r_min}-{r_max}"
            notes.append(
                f"this adapter keeps {ranks} ({100 * energy:.2f} % of the LoRA tensors' drift energy): apply from it"
                " gives that low-rank approximation of this merge"
            )
        return notes
    left = f"{100 * summary.extras_share:.2f} % of the drift energy"
    return [
        "W0 + scale · B A on the LoRA-carrying tensors, as apply gives",
        f"not the extras ({left}: {extras_text(summary)} in drift_extras.safetensors): PEFT and mergekit do not"
        " read them,"
        " so those tensors stay at the base",
    ]


def mergekit_command(config_file: str | Path, via: str) -> str:
    """The command that runs the config; a LoRA reference needs a folder for mergekit's base+adapter merge."""
    cmd = f"mergekit-yaml {shlex.quote(str(config_file))} OUT_DIR"
    if via == "lora":  # float32: PEFT adds B A in float32, not in a bf16 base's precision (whose rounding S multiplies)
        cmd += f" --lora-merge-cache {LORA_CACHE} --lora-merge-dtype float32"
    return cmd


def render_yaml(config: dict[str, Any], comments: list[str]) -> str:
    """YAML text: ``comments`` as ``#`` lines (wrapped at 116 columns), then the config in key order."""
    head = []
    for c in comments:
        indent = " " * (len(c) - len(c.lstrip()) + 2)
        head += textwrap.wrap(c, 116, subsequent_indent=indent, break_on_hyphens=False) or [""]
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1 << 16)
    return "".join(f"# {line}\n" for line in head) + body


def header(
    meta: DriftMeta, adapter_dir: str, *, scale: float, step: float, via: str, config_file: Path, command: str | None
) -> list[str]:
    """The comment lines that open the file: how it was made, how to run it, what it reproduces."""
    how = {
        "checkpoints": f"task_arithmetic over the {meta.fit} fit's checkpoints: W = W0 + Σ w_i (W_i − W0)",
        "lora": "task_arithmetic on BASE+ADAPTER (mergekit merges the PEFT adapter, W0 + B A): W = W0 + scale · B A",
    }[via]
    lines = [
        f"mergekit config written by driftmerge {__version__} export-mergekit (--via {via})",
        f"  made by: {command}" if command else None,
        "run it with:",
        f"  {mergekit_command(config_file, via)}",
        f"it reproduces `driftmerge apply {adapter_dir} --scale {scale:g}` (step {step:g}; scale 1 = step"
        f" {meta.s_ref}, the last checkpoint)",
        f"  as {how}",
    ]
    if via == "checkpoints" and meta.fit == "lsq":
        lines.append("  w_i = scale · t_ref · t_i / Σ t_j², t_i = step_i − base_step, t_ref = s_ref − base_step")
    lines += [f"  {n}" for n in fidelity_notes(meta, via)]
    if via == "lora":
        lines.append(
            f"mergekit keeps the merged base+adapter in {LORA_CACHE}/ under a name made from the two paths only:"
            " delete that folder after extracting the adapter again"
        )
    lines.append("normalize: false and lambda: 1.0 are mergekit's task_arithmetic defaults, written out")
    return [x for x in lines if x is not None]


def export_mergekit(
    adapter_dir: str | Path,
    out_file: str | Path = DEFAULT_OUTPUT,
    *,
    scale: float | None = None,
    step: float | None = None,
    via: str = "checkpoints",
    base: str | Path | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    command: str | None = None,
) -> ExportResult:
    """Read the adapter (a folder or a Hub id, as ``apply`` does), check that mergekit will find what the config
    names, and write the config atomically. ``scale`` / ``step``: ``apply``'s rules (:class:`ApplyOptions`) and map
    (:func:`~driftmerge.core.drift.scale_and_step`)."""
    target = ApplyOptions(scale=scale, step=step)  # exactly one of them, finite
    if via not in VIAS:
        raise InputError(f"--via must be one of {', '.join(VIAS)}, got {via!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    out_file = Path(out_file).absolute()
    check_output_file(out_file, overwrite)
    folder, adapter = open_adapter(adapter_dir)
    adapter_path = folder.absolute()
    meta = adapter.meta
    scale, step = scale_and_step(target.scale, target.step, base_step=meta.base_step, s_ref=meta.s_ref)
    if via == "checkpoints":
        checkpoint_weights(meta, scale)  # a pca fit fails here, before any folder is opened
    inputs = _check_inputs(adapter, via, Path(base).absolute() if base is not None else None)
    _check_not_inside(out_file, [adapter_path, *inputs])
    out_dtype = dtype if dtype != "auto" else (meta.storage_dtype or "float32")
    config = build_config(meta, scale, via=via, adapter_dir=str(adapter_path), base=str(inputs[0]), out_dtype=out_dtype)
    shown = str(adapter_path) if Path(adapter_dir).exists() else str(adapter_dir)  # a Hub id as given
    comments = header(meta, shown, scale=scale, step=step, via=via, config_file=out_file, command=command)
    write_text_atomic(out_file, render_yaml(config, comments), overwrite=overwrite, what="the config")
    models = [(_display(m["model"]), m["parameters"]["weight"]) for m in config["models"]]
    return ExportResult(out_file, via, scale, step, models, fidelity_notes(meta, via), mergekit_command(out_file, via))


def _display(ref: str | dict[str, Any]) -> str:
    """A model reference as ``PATH`` or ``PATH+LORA``, whichever form the config holds it in."""
    if isinstance(ref, str):
        return ref
    return ref["model"]["path"] + (f"+{ref['lora']['path']}" if "lora" in ref else "")


def _check_not_inside(target: Path, inputs: list[Path]) -> None:
    for folder in inputs:
        if target.resolve().is_relative_to(folder.resolve()):
            raise OutputError(f"{target}: lies inside the input folder {folder}; write the config elsewhere with -o")


def _check_inputs(adapter: Adapter, via: str, base: Path | None) -> list[Path]:
    """The folders the merge reads (base first), checked: the base (recorded, or ``base``) and, for a checkpoint
    merge, every recorded checkpoint must be model folders of the adapter's architecture. A checkpoint merge also
    needs the very base the drift was fitted from: on another base ``W0'`` the merge ``W0' + Σ w_i (W_i − W0')``
    also moves it by ``Σ w_i (W0 − W0')``."""
    recorded = adapter.meta.base
    base_ck = Checkpoint(base if base is not None else _folder(recorded.ref, "base"))
    if via == "checkpoints" and recorded.probe and base_ck.probe() != recorded.probe:
        raise InputError(
            f"{base_ck.path}: holds other weights than the base the drift was fitted from ({recorded.ref}); a"
            " checkpoint merge needs that base (or pass --via lora to move this one)"
        )
    check_matches_base(adapter, base_ck)
    folders = [base_ck.path.absolute()]
    if via == "checkpoints":
        moved = set(adapter.meta.tensors) | set(adapter.meta.tied)
        left = [n for n, i in base_ck.infos.items() if i.dtype.is_floating_point and n not in moved]
        if left:
            raise InputError(
                f"the adapter leaves {len(left)} tensor(s) at the base ({left[0]}, …: extract --include/--exclude),"
                " which a checkpoint merge would move too; pass --via lora to merge the adapter itself"
            )
        for rec in adapter.meta.checkpoints:
            ck = Checkpoint(_folder(rec.ref, f"checkpoint (step {rec.step})"))
            check_compatible(base_ck, [ck])
            folders.append(ck.path.absolute())
    return folders


def _folder(ref: str, what: str) -> str:
    if not Path(ref).is_dir():
        hint = "pass --base PATH" if what == "base" else "restore it, or pass --via lora to merge the adapter instead"
        raise InputError(f"{ref}: the recorded {what} folder is not there; {hint}")
    return ref
