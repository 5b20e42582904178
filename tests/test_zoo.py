"""The model zoo through the real CLI: every architecture as transformers loads it, PEFT as the oracle.

Per model (``tests/zoo.py``: a float32 run with an exact rank-1 line per matrix / per expert, no noise):
``driftmerge extract BASE CK… -o ADAPTER --rank 1 --factor-dtype float32`` then ``driftmerge apply ADAPTER --scale 1
-o APPLIED``; the checks below each name the model and the tensor that fails. The size check runs separately on a
bfloat16 run at hidden 128 (extract only, default flags but ``--rank 1``).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from driftmerge_cli.main import cli
from helpers import load_weights
from safetensors.torch import load_file
from zoo import ZOO, DiskMap, ZooRun, disk_map, load, make_zoo_run

ADAPTER_WEIGHTS, EXTRAS = "adapter_model.safetensors", "drift_extras.safetensors"
EXACT_FLAGS = ("--rank", "1", "--factor-dtype", "float32")  # float32 sketching: exactness must not hang on the CPU
REL_TOL = 1e-5  # |got − want| ≤ REL_TOL · max(max|want|, 1e-2) per tensor, float32
MAX_ADAPTER_SHARE = 0.15  # adapter + extras bytes over the base's safetensors bytes, bfloat16 models…
SIZE_WIDTH = 128  # …at hidden 128: at 32, safetensors headers (~100 B a key) weigh as much as rank-1 factors
NAMES = list(ZOO)
# checkpoint keys transformers 5 writes that the loaded model names otherwise: the layouts extract must map back
ON_DISK = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",  # loaded: fused mlp.experts.gate_up_proj
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.0.up_proj.weight",
    "gpt_oss": "model.layers.0.mlp.experts.gate_up_proj",  # 3-D stacked on disk too
    "gpt_neox": "embed_out.weight",
    "qwen2_vl": "model.layers.0.self_attn.q_proj.weight",  # loaded: model.language_model.layers.…
}
_KEY_WARNING = re.compile(r"(missing|unexpected)[\w ]{0,20}keys?", re.IGNORECASE)


def run_cli(*args: Any) -> str | None:
    """Run ``driftmerge ARGS`` in-process; None on success, else the first line of what went wrong."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code == 0:
        return None
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return f"{type(exc).__name__}: {first_lines(exc, 1)}"
    lines = [x for x in result.output.splitlines() if x.strip()]
    return f"exit {result.exit_code}: {lines[-1] if lines else '(no output)'}"


@dataclass
class Case:
    name: str
    run: ZooRun
    adapter: Path
    applied: Path
    layout: DiskMap
    failed: dict[str, str] = field(default_factory=dict)  # "extract" / "apply" -> first error line

    def need(self, *steps: str) -> None:
        for step in steps:
            if step in self.failed:
                pytest.fail(f"{self.name}: driftmerge {step} failed: {self.failed[step]}", pytrace=False)

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.adapter / "driftmerge.json").read_text())

    @property
    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.adapter / "adapter_config.json").read_text())


@pytest.fixture(scope="module", params=NAMES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """One float32 zoo run per model, extracted at rank 1 and applied at scale 1 (once for all the checks)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    run = make_zoo_run(folder / "run", name)
    c = Case(name, run, folder / "adapter", folder / "applied", disk_map(name))
    err = run_cli("extract", run.base, *run.checkpoints, "-o", c.adapter, *EXACT_FLAGS)
    if err is not None:
        c.failed["extract"] = c.failed["apply"] = err
    elif (err := run_cli("apply", c.adapter, "--scale", "1", "-o", c.applied)) is not None:
        c.failed["apply"] = err
    return c


def first_lines(exc: BaseException, n: int = 2) -> str:
    return " ".join(line.strip() for line in str(exc).strip().splitlines()[:n]) or type(exc).__name__


def load_or_fail(name: str, folder: Path, what: str) -> Any:
    """``folder`` loaded with entry ``name``'s Auto class, or a one-line failure naming the model and the folder."""
    try:
        return load(name, folder)
    except Exception as exc:
        pytest.fail(f"{name}: the {what} does not load: {type(exc).__name__}: {first_lines(exc)}", pytrace=False)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The loaded model's parameters (tied ones once), detached."""
    return {n: p.detach() for n, p in model.named_parameters()}


def tolerance(want: torch.Tensor) -> float:
    return REL_TOL * max(float(want.abs().max()), 1e-2) if want.numel() else 0.0


def mismatch(name: str, got: torch.Tensor, want: torch.Tensor, what: str, tol: float | None = None) -> str | None:
    """A one-line complaint when ``got`` and ``want`` differ by more than ``tol`` (default :func:`tolerance`)."""
    if got.shape != want.shape:
        return f"{name}: {what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not got.numel():
        return None
    tol = tolerance(want) if tol is None else tol
    err = float((got.float() - want.float()).abs().max())
    return None if err <= tol else f"{name}: {what}: max |Δ| {err:.3g} > {tol:.3g}"


def report(model: str, problems: list[str | None], limit: int = 12) -> None:
    found = [p for p in problems if p]
    if found:
        more = f"\n  … and {len(found) - limit} more" if len(found) > limit else ""
        pytest.fail(f"{model}: {len(found)} problem(s):\n  " + "\n  ".join(found[:limit]) + more, pytrace=False)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_run_holds_the_planted_line(name: str, tmp_path: Path) -> None:
    """The fixture itself (no driftmerge): the last checkpoint loads as ``W0 + P``, transformers wrote its own
    layout, and every loaded element is found on disk."""
    run = make_zoo_run(tmp_path / "run", name)
    base, last = params(load(name, run.base)), params(load(name, run.checkpoints[-1]))
    problems = [
        mismatch(n, last[n] - w, run.directions[n], "last − base vs planted", tolerance(w)) for n, w in base.items()
    ]
    on_disk, layout = load_weights(run.base), disk_map(name)
    if name in ON_DISK and ON_DISK[name] not in on_disk:
        problems.append(f"no {ON_DISK[name]} on disk: transformers changed the layout this zoo entry covers")
    problems += [
        f"{n}: {int((ix < 0).sum())} elements not found on disk" for n, ix in layout.index.items() if (ix < 0).any()
    ]
    report(name, problems)


def test_apply_reproduces_last_checkpoint(case: Case) -> None:
    """An exact rank-1 line, no noise: ``apply --scale 1`` is the last checkpoint, parameter by parameter."""
    case.need("apply")
    got = params(load_or_fail(case.name, case.applied, "applied model"))
    want = params(load(case.name, case.run.checkpoints[-1]))
    problems: list[str | None] = [f"{n}: missing from the applied model" for n in want.keys() - got.keys()]
    problems += [mismatch(n, got[n], w, "applied vs last checkpoint") for n, w in want.items() if n in got]
    report(case.name, problems)


def test_no_drifted_tensor_is_left_out(case: Case) -> None:
    """Every checkpoint tensor that moved has a record stored as LoRA or extras."""
    case.need("extract")
    base, last = load_weights(case.run.base), load_weights(case.run.checkpoints[-1])
    records = case.meta["tensors"]
    problems = []
    for key, w in base.items():
        if torch.equal(w, last[key]):
            continue
        rec = records.get(key)
        if rec is None:
            problems.append(f"{key}: drifted but has no record in driftmerge.json")
        elif rec["stored"] not in ("lora", "extras"):
            problems.append(f"{key}: drifted but stored as {rec['stored']!r}")
    report(case.name, problems)


def test_task_type_suits_the_model_class(case: Case) -> None:
    case.need("extract")
    got, want = case.adapter_config.get("task_type"), case.run.entry.task_type
    if got != want:
        pytest.fail(f"{case.name} ({case.run.entry.auto}): task_type {got!r}, want {want!r}", pytrace=False)


def test_peft_loads_injects_and_merges_like_apply(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    """PEFT's loader injects every target without key complaints; its merge is APPLIED, except that tensors whose
    drift sits in the extras stay exactly the base's."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    case.need("apply")
    name, cfg = case.name, case.adapter_config
    model = load(name, case.run.base)
    base = {n: p.clone() for n, p in params(model).items()}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, case.adapter)
        except Exception as exc:
            pytest.fail(
                f"{name}: PEFT cannot load the adapter: {type(exc).__name__}: {first_lines(exc)}", pytrace=False
            )
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    problems: list[str | None] = [f"PEFT warned: {s.splitlines()[0][:300]}" for s in said if _KEY_WARNING.search(s)]

    tuner = peft_model.base_model
    modules, parameters = list(tuner.targeted_module_names), list(getattr(tuner, "targeted_parameter_names", []))
    layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        problems.append("PEFT injected no LoRA layer")
    if len(layers) != len(modules) + len(parameters):
        problems.append(f"{len(layers)} LoRA layers for {len(modules)} modules + {len(parameters)} parameters")
    problems += _uninjected(cfg.get("target_modules"), modules, "target_modules")
    problems += _uninjected(cfg.get("target_parameters"), parameters, "target_parameters")

    on_disk = load_file(str(case.adapter / ADAPTER_WEIGHTS))  # PEFT's own save is the reference key set
    placed = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    problems += [f"adapter key {k}: not placed by PEFT (unexpected)" for k in sorted(on_disk.keys() - placed.keys())]
    problems += [f"PEFT weight {k}: not in the adapter file (missing)" for k in sorted(placed.keys() - on_disk.keys())]
    problems += [mismatch(k, placed[k], on_disk[k], "loaded vs file", 0.0) for k in on_disk.keys() & placed.keys()]

    merged = params(peft_model.merge_and_unload())
    applied = params(load_or_fail(name, case.applied, "applied model"))
    extras = {k for k, r in case.meta["tensors"].items() if r["stored"] == "extras"}
    for n, w in merged.items():
        if n not in applied or n not in base:
            problems.append(f"{n}: in the merged model but not in the applied model or the base")
            continue
        in_extras = case.layout.mask(n, extras)
        problems.append(
            mismatch(n, w[~in_extras], applied[n][~in_extras], "PEFT merge vs apply", tolerance(applied[n]))
        )
        if in_extras.any() and not torch.equal(w[in_extras], base[n][in_extras]):
            problems.append(
                f"{n}: drift kept in the extras ({', '.join(sorted(case.layout.keys_of(n)))}) but PEFT's merge moved it"
            )
    report(name, problems)


def _uninjected(targets: Any, injected: list[str], field_name: str) -> list[str]:
    """Entries of ``targets`` (a list: PEFT's suffix rule; a string: a full-match regex) that PEFT did not inject."""
    if not targets:
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in injected) else [f"{field_name} regex matched nothing"]
    return [
        f"{field_name} entry {t!r} was not injected"
        for t in targets
        if not any(n == t or n.endswith(f".{t}") for n in injected)
    ]


def test_applied_model_runs(case: Case) -> None:
    case.need("apply")
    model = load_or_fail(case.name, case.applied, "applied model")
    with torch.no_grad():
        logits = model(**case.run.entry.inputs()).logits
    if not torch.isfinite(logits).all():
        pytest.fail(f"{case.name}: non-finite logits from the applied model", pytrace=False)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_is_small(name: str, tmp_path: Path) -> None:
    """On a bfloat16 run at hidden 128: ``adapter_model + drift_extras`` bytes ≤ 15 % of the base's
    ``*.safetensors`` bytes."""
    run = make_zoo_run(tmp_path / "run", name, dtype=torch.bfloat16, hidden=SIZE_WIDTH)
    adapter = tmp_path / "adapter"
    err = run_cli("extract", run.base, *run.checkpoints, "-o", adapter, "--rank", "1")
    if err is not None:
        pytest.fail(f"{name}: driftmerge extract failed: {err}", pytrace=False)
    size = sum((adapter / f).stat().st_size for f in (ADAPTER_WEIGHTS, EXTRAS) if (adapter / f).is_file())
    base = sum(f.stat().st_size for f in run.base.glob("*.safetensors"))
    if size > MAX_ADAPTER_SHARE * base:
        pytest.fail(f"{name}: adapter + extras {size} B is {size / base:.1%} of the base's {base} B", pytrace=False)
