"""``driftmerge analyze``: one streaming pass over base + checkpoints → ``report.json``, ``report.md``, figures.

Memory: as ``extract`` (read-ahead within ``max_memory``), except that the deltas of one tensor are all held at
once (the Gram matrix needs every pair), as ``--fit pca`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from driftmerge.core.devices import resolve_device
from driftmerge.core.linearity import MIN_SAMPLE, TensorStats, layer_of, module_type, tensor_stats
from driftmerge.errors import InputError
from driftmerge.io.adapter import META, read_adapter
from driftmerge.io.architecture import describe
from driftmerge.io.checkpoints import open_run
from driftmerge.io.jsonl import read_records
from driftmerge.io.outputs import atomic_output_dir, check_output_dir
from driftmerge.io.stream import raise_not_finite, stream_deltas
from driftmerge.progress import Progress
from driftmerge.reports.linearity import build_report, check_plotting, markdown, summary_rows, write_json
from driftmerge.reports.linearity_figures import draw_figures


@dataclass
class AnalyzeOptions:
    steps: Sequence[int] | None = None
    base_step: int = 0
    sample_frac: float = 1e-3  # share of each tensor's elements sampled for per-element R²
    min_sample: int = MIN_SAMPLE  # ... but at least this many per tensor (every element of a smaller tensor)
    spectrum: int = 8  # top singular values whose energy shares are reported (1, 2, 4, ..., K)
    min_move: float = 0.1  # elements whose range is below this × the sample's median range are left out
    seed: int = 0
    device: str = "cpu"
    max_memory: int = 1 << 30
    logprobs: str | Path | None = None  # JSONL of {prompt, response}
    logprob_min_move: float = 0.2  # tokens whose log-prob moved by more are kept (the seed paper's rule)
    batch_size: int = 8
    figures: bool = True  # False: report.json and report.md only, no matplotlib needed (what the demo uses without it)

    def validate(self) -> None:
        if not 0.0 < self.sample_frac <= 1.0:
            raise InputError(f"--sample-frac must lie in (0, 1], got {self.sample_frac}")
        if self.min_sample < 1:
            raise InputError(f"--min-sample must be 1 or more, got {self.min_sample}")
        if self.spectrum < 0:
            raise InputError(f"--spectrum must be 0 or more, got {self.spectrum}")
        if self.min_move < 0 or self.logprob_min_move < 0:
            raise InputError("--min-move and --logprob-min-move must not be negative")
        if self.logprobs is not None and not Path(self.logprobs).is_file():
            raise InputError(f"{self.logprobs}: no such file (--logprobs wants a JSONL of prompt/response pairs)")


@dataclass
class AnalyzeResult:
    out_dir: Path
    report: dict[str, Any]
    figures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # figures left out: why

    def table(self) -> list[list[str]]:
        return summary_rows(self.report)


def analyze(
    base: str | Path,
    checkpoints: Sequence[str | Path],
    *,
    out_dir: str | Path,
    options: AnalyzeOptions | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> AnalyzeResult:
    """Measure how linear the run from ``base`` through ``checkpoints`` is; write the report folder."""
    opts = options or AnalyzeOptions()
    opts.validate()
    if opts.figures:
        check_plotting()
    if not checkpoints:
        raise InputError("give at least one checkpoint after the base (or an adapter folder alone)")
    device = resolve_device(opts.device)
    base_ck, cks, steps, _ = open_run(base, checkpoints, steps=opts.steps, base_step=opts.base_step)
    out_dir = Path(out_dir)
    inputs = [base_ck.path, *(c.path for c in cks)]
    check_output_dir(out_dir, inputs, overwrite=overwrite)
    pairs = _read_pairs(Path(opts.logprobs)) if opts.logprobs else None

    shapes = {n: i.shape for n, i in base_ck.infos.items()}
    arch = describe(base_ck.config, shapes, folder=base_ck.path, guess=True)  # only the ties matter here
    names = [n for n, i in base_ck.infos.items() if i.dtype.is_floating_point and n not in arch.tied]
    t = [s - opts.base_step for s in steps]
    stats: list[TensorStats] = []
    read_ahead = min(opts.max_memory // 4, 1 << 30)
    sources = [base_ck, *cks]
    for done, (name, deltas) in enumerate(stream_deltas(names, sources, device=device, read_ahead=read_ahead), 1):
        ds = []
        for j, d in deltas:
            if not bool(torch.isfinite(torch.linalg.vector_norm(d))):
                raise_not_finite(name, base_ck, ckpt=sources[j])
            ds.append(d)
        stats.append(
            tensor_stats(
                name,
                ds,
                t=t,
                sample_frac=opts.sample_frac,
                min_sample=opts.min_sample,
                spectrum=opts.spectrum,
                min_move=opts.min_move,
                seed=opts.seed,
            )
        )
        del ds
        if progress:
            progress(done, len(names), name)

    logprobs = None
    if pairs is not None:
        from driftmerge.evaluation.logprobs import logprob_linearity  # transformers: only when asked

        logprobs = logprob_linearity(base_ck.path, [c.path for c in cks], pairs=pairs, t=t, opts=opts, device=device)
    refs = {
        "source": "checkpoints",
        "base": str(base_ck.path.absolute()),
        "checkpoints": [str(c.path.absolute()) for c in cks],
    }
    settings = {
        "sample_frac": opts.sample_frac,
        "min_sample": opts.min_sample,
        "spectrum": opts.spectrum,
        "min_move": opts.min_move,
        "seed": opts.seed,
        "logprob_min_move": opts.logprob_min_move if pairs is not None else None,
    }
    report = build_report(stats, steps, base_step=opts.base_step, refs=refs, settings=settings, logprobs=logprobs)
    return _write(report, stats, out_dir, inputs, overwrite, draw=opts.figures)


def analyze_adapter(adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> AnalyzeResult:
    """Render what ``extract`` recorded in an adapter's ``driftmerge.json`` (pooled R², kept energy, drift norms).

    Without the checkpoints there is no per-element R², no per-checkpoint norm, no direction stability and no
    trajectory; group R² values here weigh each tensor's R² by its drift energy, which is not the pooled sum the full
    analysis uses. The steps are those of the checkpoints ``extract`` fitted.
    """
    check_plotting()
    adapter = read_adapter(adapter_dir)
    meta = adapter.meta
    out_dir = Path(out_dir)
    check_output_dir(out_dir, [Path(adapter_dir)], overwrite=overwrite)
    stats = []
    for name, rec in meta.tensors.items():
        norm = rec.drift_norm
        r2 = rec.r2
        weight = norm * norm if r2 is not None else 0.0
        energy = rec.energy
        stats.append(
            TensorStats(
                name=name,
                module_type=module_type(name),
                layer=layer_of(name),
                shape=rec.shape,
                delta_norms=[],
                step_cosines=[],
                projection=[],
                drift_norm=norm,
                ss_tot=weight,
                ss_res=(1.0 - r2) * weight if r2 is not None else 0.0,
                energy_top={1: energy} if rec.rank == 1 and energy is not None else None,
            )
        )
    steps = [c.step for c in meta.checkpoints]
    refs = {
        "source": "adapter",
        "base": meta.base.ref,
        "checkpoints": [f"{Path(adapter_dir).absolute()} ({META})"],
    }
    settings = {
        "sample_frac": None,
        "min_sample": None,
        "spectrum": None,
        "min_move": None,
        "seed": meta.seed,
        "logprob_min_move": None,
    }
    report = build_report(stats, steps, base_step=meta.base_step, refs=refs, settings=settings)
    report["checkpoints"] = [c.model_dump() for c in meta.checkpoints]
    return _write(report, stats, out_dir, [Path(adapter_dir)], overwrite)


def _write(
    report: dict[str, Any],
    stats: list[TensorStats],
    out_dir: Path,
    inputs: list[Path],
    overwrite: bool,
    draw: bool = True,
) -> AnalyzeResult:
    with atomic_output_dir(out_dir, inputs, overwrite=overwrite) as tmp:
        if draw:
            figures, skipped = draw_figures(report, stats, out=tmp)
        else:
            figures, skipped = {}, {"all figures": "left out (figures=False); `driftmerge analyze` draws them"}
        write_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(markdown(report, figures, skipped=skipped))
    return AnalyzeResult(out_dir=out_dir, report=report, figures=figures, skipped=skipped)


def _read_pairs(path: Path) -> list[dict[str, str]]:
    return [
        {"prompt": r["prompt"], "response": r["response"]}
        for _, r in read_records(path, ("prompt", "response"), what="prompt/response pairs")
    ]
