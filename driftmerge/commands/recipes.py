"""Recipes: a YAML job file whose ``extract``, ``apply`` and ``push`` stages run in that order.

``driftmerge run recipes/NAME.yaml`` loads a recipe with :func:`load_recipe` (the models of
:mod:`driftmerge.commands.recipe_schema`; unknown keys are refused with the key named), prints :func:`plan` (the
equivalent ``driftmerge ...`` command lines, one per stage, written from the same option definitions as the
commands' flags) and runs it with :func:`run_recipe`, which calls the same library functions as those commands.

Every stage is optional, but a recipe holds at least one. Left out, ``apply.adapter`` is the extract stage's output
and ``push.folder`` is the apply stage's output (else the extract stage's). ``push_to_hub: org/name`` in an extract
or apply stage pushes that stage's output right after it (as ``--push-to-hub`` does), public unless ``hub_private``.
Before anything runs, every output folder is checked (it must not exist, unless ``overwrite``), so is the Hub
token of every push that is not a dry run, and so are the inputs (:func:`check_inputs`: every local input exists,
every other one reads as a Hub id; an apply stage's explicit scale is not negative without
``allow_negative_scale``), so a late stage does not fail after an early one has spent its time. ``driftmerge run
--dry-run`` checks the inputs too.

Relative paths in a recipe resolve against the current working directory (the folder ``driftmerge run`` is started
from), not against the recipe file's folder, exactly like the same paths typed on the command line. A base or
checkpoint may also be a Hub id (``org/name`` or ``org/name@revision``): it is passed on as given.
"""

from __future__ import annotations

import functools
import inspect
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from driftmerge.commands.flags import OptionsModel, flag_args, kind, problem, split_at_output
from driftmerge.commands.options import ApplyOptions, ExtractOptions, RunDirSelection
from driftmerge.commands.recipe_schema import ApplyStage, ExtractStage, PushStage, Recipe
from driftmerge.errors import InputError, OutputError
from driftmerge.io.outputs import check_output_dir
from driftmerge.progress import Progress

__all__ = [
    "Recipe",
    "Stage",
    "StageResult",
    "check_inputs",
    "load_recipe",
    "plan",
    "preflight",
    "run_recipe",
    "stages",
]


# ---- loading ---------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; every problem becomes one :class:`InputError` line naming the file and keys."""
    data = _read_yaml(Path(path))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{path}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InputError(f"{path}: no such recipe file")
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a recipe file (give recipes/NAME.yaml)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the recipe ({exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if data is None:
        raise InputError(f"{path}: the recipe is empty; give at least one stage: extract, apply or push")
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of stages (extract, apply, push), got {kind(data)}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _describe(err: Any) -> str:
    """One pydantic error as ``unknown key a.b (allowed: …)`` or ``a.b: what is wrong``."""
    loc, key = err["loc"], _dotted(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(_keys(model))})" if model is not None else ""
        return f"unknown key {key}{allowed}"
    if err["type"] == "missing":
        return f"{key}: required key missing"
    if err["type"] == "model_type":
        return f"{key}: must be a mapping of keys, got {kind(err['input'])}"
    msg = problem(err)  # a conflict between keys names them as keys
    return f"{key}: {msg}" if key else msg


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (for the list of allowed keys)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        kinds = (field.annotation, *get_args(field.annotation)) if field is not None else ()
        found = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


def _keys(model: type[BaseModel]) -> list[str]:
    """A model's keys, the stage's own (base, checkpoints, …) before those of the options it extends."""
    own = [name for name in inspect.get_annotations(model) if name in model.model_fields]
    return [*own, *(name for name in model.model_fields if name not in own)]


# ---- plan ------------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: str  # extract | apply | push
    what: str  # PEFT adapter | model | scaled PEFT adapter | Hub upload
    folder: Path  # what the stage wrote (or pushed)
    result: Any  # ExtractResult | ApplyResult | PushResult
    pushed: Any = None  # the PushResult of push_to_hub, if the stage had one


@dataclass
class Stage:
    name: str  # extract | apply | push
    command: str  # the equivalent driftmerge command line
    run: Callable[[Progress | None, str | None], StageResult]  # (progress, command to record) -> result


def stages(recipe: Recipe) -> list[Stage]:
    """The recipe's stages in running order."""
    out: list[Stage] = []
    if (e := recipe.extract) is not None:
        out.append(Stage("extract", _extract_line(e), functools.partial(_run_extract, e)))
    if (a := recipe.apply) is not None:
        out.append(Stage("apply", _apply_line(a), functools.partial(_run_apply, a)))
    if (p := recipe.push) is not None:
        out.append(Stage("push", _push_line(p), functools.partial(_run_push, p)))
    return out


def plan(recipe: Recipe) -> list[str]:
    """The equivalent ``driftmerge ...`` command lines, one per stage, in running order."""
    return [s.command for s in stages(recipe)]


def _extract_line(e: ExtractStage) -> str:
    inputs = flag_args(e.run_dir, RunDirSelection) if e.run_dir is not None else list(e.checkpoints or [])
    return _options_line("extract", [e.base, *inputs], e, ExtractOptions, e.output)


def _apply_line(a: ApplyStage) -> str:
    return _options_line("apply", [str(a.adapter)], a, ApplyOptions, str(a.output))


def _options_line(
    name: str, inputs: list[str], stage: ExtractStage | ApplyStage, model: type[OptionsModel], output: str
) -> str:
    """``driftmerge NAME INPUTS... [options] -o OUTPUT [options]``, with only the options the stage changes from
    their defaults, in the order ``--help`` lists them."""
    before, after = split_at_output(model)
    args = [name, *inputs, *flag_args(stage, model, names=before), "-o", output, *flag_args(stage, model, names=after)]
    return _command(args, stage.overwrite, stage.push_to_hub, stage.hub_private)


def _push_line(p: PushStage) -> str:
    args = ["push", str(p.folder), p.repo_id, *_flag("--revision", p.revision), *_flag("--analysis", p.analysis)]
    switches = (("--private", p.private), ("--create-pr", p.create_pr), ("--dry-run", p.dry_run))
    return _command([*args, *(flag for flag, on in switches if on)])


def _flag(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _command(args: list[str], overwrite: bool = False, push_to_hub: str | None = None, private: bool = False) -> str:
    args = [*args, *(["--overwrite"] if overwrite else []), *_flag("--push-to-hub", push_to_hub)]
    return shlex.join(["driftmerge", *args, *(["--hub-private"] if push_to_hub and private else [])])


# ---- running ---------------------------------------------------------------------------------------------------
StageRunner = Callable[[int, int, Stage], StageResult]


def run_recipe(
    recipe: Recipe, *, progress: Progress | None = None, command: str | None = None, each: StageRunner | None = None
) -> list[StageResult]:
    """Check the recipe's outputs and tokens (:func:`preflight`), then run every stage in order; ``command`` (e.g.
    ``driftmerge run recipes/x.yaml``) goes in the model cards. ``each(i, n, stage)``, when given, runs stage ``i``
    of ``n`` in the caller's way (the CLI prints a header, shows a progress bar and prints the stage's summary) by
    calling ``stage.run(progress, command)`` and returning its result."""
    preflight(recipe)
    todo = stages(recipe)
    run = each or (lambda i, n, stage: stage.run(progress, command))
    return [run(i, len(todo), stage) for i, stage in enumerate(todo, 1)]


def preflight(recipe: Recipe) -> None:
    """Before any stage runs, refuse an output folder that exists (without ``overwrite``) or that overlaps the
    extract stage's output, a push (not a dry run) without a Hub token, and missing inputs (:func:`check_inputs`):
    a late stage must not fail after an early one has spent its time."""
    e, a, p = recipe.extract, recipe.apply, recipe.push
    if e is not None:
        _check_output("extract", e.output, e.overwrite, [])
    if a is not None:
        _check_output("apply", str(a.output), a.overwrite, [Path(e.output)] if e is not None else [])
    pushes = [e.push_to_hub if e else None, a.push_to_hub if a else None, p.repo_id if p and not p.dry_run else None]
    for repo_id in filter(None, pushes):
        from driftmerge.hub.publish import require_token

        require_token(repo_id)
    check_inputs(recipe)


def check_inputs(recipe: Recipe, where: str | Path | None = None) -> None:
    """Every input a stage reads, unless an earlier stage writes it, must be a local path that exists or else read
    as a Hub id ``org/name[@revision]`` (not fetched here); all those that are neither go in one
    :class:`InputError` line, prefixed with ``where`` (the recipe file). An apply stage's explicit negative scale
    needs ``allow_negative_scale`` (:meth:`ApplyOptions.check_direction`)."""
    from driftmerge.hub.refs import parse_hub_ref

    missing = [
        f"{key} {value}"
        for key, value, hub in _inputs(recipe)
        if not Path(value).exists() and not (hub and parse_hub_ref(value) is not None)
    ]
    prefix = f"{where}: " if where is not None else ""
    if missing:
        raise InputError(
            f"{prefix}missing input{'s' * (len(missing) > 1)}, neither a local path that exists nor a Hub id"
            " org/name[@revision]: " + "; ".join(missing)
        )
    a = recipe.apply
    if a is not None and a.scale is not None:
        try:
            ApplyOptions.of(a).check_direction(a.scale)  # a step's scale needs the adapter: apply checks it
        except InputError as exc:
            raise InputError(f"{prefix}apply: {exc}") from None


def _inputs(recipe: Recipe) -> list[tuple[str, str, bool]]:
    """(key, value, may be a Hub id) of every input no earlier stage writes."""
    e, a, p = recipe.extract, recipe.apply, recipe.push
    out: list[tuple[str, str, bool]] = []
    if e is not None:
        out.append(("extract.base", e.base, True))
        out += [(f"extract.checkpoints[{i}]", c, True) for i, c in enumerate(e.checkpoints or [])]
        if e.run_dir is not None:
            out.append(("extract.run_dir.path", e.run_dir.path, False))
    written = {Path(e.output)} if e is not None else set()
    if a is not None:
        if a.adapter is not None and Path(a.adapter) not in written:
            out.append(("apply.adapter", a.adapter, True))
        if a.base is not None:
            out.append(("apply.base", a.base, True))
        written.add(Path(str(a.output)))
    if p is not None:
        if p.folder is not None and Path(p.folder) not in written:
            out.append(("push.folder", p.folder, False))
        if p.analysis is not None:
            out.append(("push.analysis", p.analysis, False))
    return out


def _check_output(stage: str, out: str, overwrite: bool, inputs: list[Path]) -> None:
    try:
        check_output_dir(Path(out), inputs, overwrite=overwrite)
    except OutputError as exc:
        msg = str(exc).replace("pass --overwrite", f"set {stage}.overwrite: true in the recipe")
        raise OutputError(msg.replace("choose another -o", f"change {stage}.output")) from None


def _recorded(command: str | None, line: str) -> str:
    """What a model card records: the stage's own command line, under the recipe command when there is one."""
    return line if command is None else f"{command}\n# this stage: {line}"


def _run_extract(e: ExtractStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.commands.extract import extract

    if e.checkpoints is not None:
        checkpoints = e.checkpoints
    else:
        assert e.run_dir is not None  # the schema wants exactly one of them
        checkpoints = [str(f.path) for f in e.run_dir.select()[0]]
    result = extract(
        e.base,
        checkpoints,
        out_dir=e.output,
        options=ExtractOptions.of(e),
        overwrite=e.overwrite,
        progress=progress,
        command=_recorded(command, _extract_line(e)),
    )
    pushed = _push_after(result.out_dir, e.push_to_hub, e.hub_private)
    return StageResult("extract", "PEFT adapter", result.out_dir, result, pushed)


def _run_apply(a: ApplyStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.commands.apply import apply_drift

    result = apply_drift(
        str(a.adapter),
        str(a.output),
        options=ApplyOptions.of(a),
        overwrite=a.overwrite,
        progress=progress,
        command=_recorded(command, _apply_line(a)),
    )
    pushed = _push_after(result.out_dir, a.push_to_hub, a.hub_private)
    return StageResult("apply", a.writes, result.out_dir, result, pushed)


def _push_after(folder: Path, repo_id: str | None, private: bool) -> Any:
    """``push_to_hub``: push what the stage wrote, as ``--push-to-hub`` does (None without one)."""
    if repo_id is None:
        return None
    from driftmerge.hub.publish import push_folder  # the Hub client loads only when a recipe pushes

    return push_folder(folder, repo_id, private=private)


def _run_push(p: PushStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.hub.publish import push_folder

    folder = Path(str(p.folder))
    result = push_folder(
        folder,
        p.repo_id,
        private=p.private,
        revision=p.revision,
        create_pr=p.create_pr,
        dry_run=p.dry_run,
        analysis=p.analysis,
    )
    return StageResult("push", "Hub upload", folder, result)
