"""The embedded default job: a real (tiny) RLVR run, extracted at rank 1 and extrapolated to scale 1.5.

The run ships with driftmerge (``driftmerge/data/toy-rlvr``, about 6 MB): the base and four GRPO checkpoints of the
toy recipe (a tiny Llama-shaped model learning 2-digit addition with a 0/1 reward), in the setting of the regime
grid closest to the seed paper's: the smaller learning rate, a KL term, the wider model, the longer run (see that
folder's README.md and docs/validation.md, "Regimes"). The demo measures the run with ``analyze``, fits the drift,
writes the model at scale 1.5 (step 900, 300 steps beyond the last checkpoint) and scores the base, the last
checkpoint, the rank-1 model at scale 1 and the extrapolated one on the recipe's held-out problems, whatever the
outcome.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from driftmerge.commands.apply import ApplyResult, apply_drift
from driftmerge.commands.extract import ExtractOptions, ExtractResult, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.io.outputs import atomic_output_dir
from driftmerge.progress import Progress
from driftmerge.schema import read_meta

DEMO_STEPS = (150, 300, 450, 600)
DEMO_SCALE = 1.5
DATA = "toy-rlvr"
ADAPTER, MODEL, AT_ONE, ANALYSIS = "driftmerge-adapter", "driftmerge-model", "model-scale-1", "driftmerge-analysis"


@dataclass
class DemoReport:
    folder: Path
    extracted: ExtractResult
    applied: ApplyResult
    accuracy: dict[str, float]  # held-out greedy accuracy: base, last checkpoint, rank-1 at scale 1, at DEMO_SCALE
    problems: int
    linearity: dict[str, float]  # `analyze` on the run, the whole model: r2, elem_r2_median, energy_rank1

    @property
    def extrapolation_gain(self) -> float:
        """Accuracy at DEMO_SCALE minus the last checkpoint's: > 0 when extrapolating helped on this run."""
        return self.accuracy["extrapolated"] - self.accuracy["last"]


def setting() -> str:
    """The shipped run's training setting, as its run.json records it: ``width 128, Adam 5e-5, KL 0.1, 600 steps``."""
    cfg = json.loads((resources.files("driftmerge") / "data" / DATA / "run.json").read_text())["config"]
    lr = f"{cfg['rl_lr']:g}".replace("e-0", "e-")
    return f"width {cfg['hidden']}, Adam {lr}, KL {cfg['kl_coef']:g}, {cfg['rl_steps']} steps"


def copy_run(folder: Path) -> Path:
    """The shipped toy run, copied to ``folder/run`` (base/, checkpoint-<step>/, run.json)."""
    src = resources.files("driftmerge") / "data" / DATA
    with resources.as_file(src) as path:
        shutil.copytree(path, folder / "run", ignore=shutil.ignore_patterns("README.md"))
    return folder / "run"


def extract_command(folder: Path, show: Callable[[Path], str] = str) -> str:
    """The ``driftmerge extract`` the demo runs in ``folder``, its paths written by ``show``."""
    run = folder / "run"
    paths = [run / "base", *(run / f"checkpoint-{s}" for s in DEMO_STEPS)]
    return shlex.join(["driftmerge", "extract", *map(show, paths), "-o", show(folder / ADAPTER)])


def apply_command(
    folder: Path, show: Callable[[Path], str] = str, *, scale: float = DEMO_SCALE, out: str = MODEL
) -> str:
    """The ``driftmerge apply`` the demo runs in ``folder`` (or one at another ``scale`` into ``folder/out``), its
    paths written by ``show``."""
    args = ["driftmerge", "apply", show(folder / ADAPTER), "--scale", f"{scale:g}", "-o", show(folder / out)]
    return shlex.join(args)


def run_demo(
    folder: str | Path,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    started: Callable[[], None] | None = None,
) -> DemoReport:
    """Copy the run into ``folder``, analyze it, extract at rank 1, apply at scale 1 and 1.5, score them all.

    ``folder`` is one atomic output (:func:`~driftmerge.io.outputs.atomic_output_dir`): it is built in a temporary
    sibling and renamed into place when complete (replacing an existing one only with ``overwrite``), so a failure
    or Ctrl-C leaves no folder, or the previous one. ``started()`` is called once that sibling could be made."""
    target = Path(folder).absolute()
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        if started is not None:
            started()
        rep = _run(tmp, progress)
        _relocate(tmp, target)
    extracted = replace(rep.extracted, out_dir=target / ADAPTER, meta=read_meta(target / ADAPTER / "driftmerge.json"))
    return replace(rep, folder=target, extracted=extracted, applied=replace(rep.applied, out_dir=target / MODEL))


def _run(folder: Path, progress: Progress | None) -> DemoReport:
    from driftmerge.commands.analyze import AnalyzeOptions, analyze
    from driftmerge.evaluation.addition import accuracy, held_out, max_new_tokens
    from driftmerge.io.models import load_causal_lm, load_tokenizer
    from driftmerge.reports.linearity import plotting_available

    run = copy_run(folder)
    cfg = json.loads((run / "run.json").read_text())["config"]  # the recipe's ToyConfig, as recorded
    cks = [run / f"checkpoint-{s}" for s in DEMO_STEPS]
    opts = AnalyzeOptions(figures=plotting_available())  # the report's figures where the plot extra is installed
    model = analyze(run / "base", cks, out_dir=folder / ANALYSIS, options=opts, progress=progress).report["model"]
    linearity = {k: model[k] for k in ("r2", "elem_r2_median", "energy_rank1")}
    adapter = folder / ADAPTER
    extracted = extract(
        run / "base",
        cks,
        out_dir=adapter,
        options=ExtractOptions(rank=1),
        progress=progress,
        command=extract_command(folder),
    )
    applied = apply_drift(
        adapter,
        folder / MODEL,
        options=ApplyOptions(scale=DEMO_SCALE),
        progress=progress,
        command=apply_command(folder),
    )
    at_one = apply_drift(adapter, folder / AT_ONE, options=ApplyOptions(scale=1.0), progress=progress)
    problems = held_out(cfg["eval_size"], cfg["digits"], seed=cfg["seed"])
    tok = load_tokenizer(run / "base")
    models = {"base": run / "base", "last": cks[-1], "rank1": at_one.out_dir, "extrapolated": applied.out_dir}
    acc = {
        k: accuracy(load_causal_lm(p), tok, pairs=problems, max_new_tokens=max_new_tokens(cfg["digits"]))
        for k, p in models.items()
    }
    return DemoReport(folder, extracted, applied, acc, len(problems), linearity)


def _relocate(tmp: Path, target: Path) -> None:
    """Make the paths the outputs record name ``target``, which ``tmp`` is about to become: driftmerge.json and
    adapter_config.json name the base and checkpoints the adapter was fitted from (``apply`` and ``export-mergekit``
    read them there), the cards and the recorded commands name the inputs. The demo reads and writes everything in
    ``tmp``, so only its own absolute path (plain, and as JSON writes it) needs replacing."""
    pairs = {str(tmp): str(target), json.dumps(str(tmp))[1:-1]: json.dumps(str(target))[1:-1]}
    for output in (ADAPTER, MODEL, AT_ONE, ANALYSIS):
        for path in sorted((tmp / output).iterdir()):
            if path.suffix not in (".json", ".md"):
                continue
            text = new = path.read_text(encoding="utf-8")
            for old, moved in pairs.items():
                new = new.replace(old, moved)
            if new != text:
                path.write_text(new, encoding="utf-8")
