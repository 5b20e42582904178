"""Recipes: a YAML job file whose ``extract``, ``apply`` and ``push`` stages run in that order.

``driftmerge run recipes/NAME.yaml`` loads a recipe with :func:`load_recipe` (pydantic models; unknown keys are
refused with the key named), prints :func:`plan` (the equivalent ``driftmerge ...`` command lines, one per stage)
and runs it with :func:`run_recipe`, which calls the same library functions as those commands.

Every stage is optional, but a recipe holds at least one. Left out, ``apply.adapter`` is the extract stage's output
and ``push.folder`` is the apply stage's output (else the extract stage's). ``push_to_hub: org/name`` in an extract
or apply stage pushes that stage's output right after it (as ``--push-to-hub`` does), public unless ``hub_private``.
Before anything runs, every output folder is checked (it must not exist, unless ``overwrite``) and so is the Hub
token of every push that is not a dry run, so a late stage does not fail after an early one has spent its time.

Relative paths in a recipe resolve against the current working directory (the folder ``driftmerge run`` is started
from), not against the recipe file's folder, exactly like the same paths typed on the command line. A base or
checkpoint may also be a Hub id (``org/name`` or ``org/name@revision``): it is passed on as given.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from driftmerge.errors import InputError, OutputError
from driftmerge.io.memory import parse_size
from driftmerge.io.outputs import check_output_dir
from driftmerge.io.rundirs import parse_range
from driftmerge.progress import Progress

MIN_MEMORY = 64 << 20  # the floor of commands.extract.MIN_MEMORY (that module imports torch; a test keeps them equal)
# the extract stage's keys that are fields of driftmerge.commands.extract.ExtractOptions, in command-line order
OPTION_KEYS = ("steps", "base_step", "rank", "fit", "svd", "device", "factor_dtype", "max_memory", "include",
               "exclude", "seed")  # fmt: skip
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # NAMESPACE/NAME; publish.check_repo_id checks more
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# ---- schema ----------------------------------------------------------------------------------------------------
def _repo_id(value: str | None) -> str | None:
    if value is not None and not _REPO_ID.fullmatch(value):
        raise ValueError(f"must be a Hub repo id NAMESPACE/NAME (no @revision here), got {value!r}")
    return value


class RunDir(BaseModel):
    """Take the checkpoints from a training run's folder (as ``extract --run-dir``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1)  # TRL output_dir (checkpoint-N/), verl (global_step_N/actor/huggingface/), step_N/
    every: int | None = Field(default=None, ge=1)  # keep steps that are multiples of K
    last: int | None = Field(default=None, ge=1)  # then keep the last N
    steps_range: str | None = None  # "A:B", "A:" or ":B": keep A <= step <= B (applied between every and last)

    @field_validator("steps_range")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_range(value)
            except InputError as exc:
                raise ValueError(str(exc).removeprefix("--steps-range: ")) from None
        return value


class ExtractStage(BaseModel):
    """``driftmerge extract``: fit the drift of base + checkpoints and write a PEFT adapter folder."""

    model_config = ConfigDict(extra="forbid", strict=True)

    base: str = Field(min_length=1)  # local model folder or Hub id org/name[@revision]
    checkpoints: list[str] | None = Field(default=None, min_length=1)  # folders or Hub ids; or run_dir instead
    run_dir: RunDir | None = None
    output: str = Field(default="driftmerge-adapter", min_length=1)  # adapter folder to write
    fit: Literal["lsq", "pca", "endpoint"] = "lsq"
    rank: int | float = 1  # int: fixed rank; float in (0, 1]: share of the drift energy to keep
    svd: Literal["randomized", "exact"] = "randomized"
    device: str = "auto"  # auto | cpu | cuda[:i]
    factor_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    include: str | None = None  # regex: only tensors whose name matches
    exclude: str | None = None  # regex: leave out tensors whose name matches
    seed: int = 0
    steps: list[int] | None = Field(default=None, min_length=1)  # default: from folder names, else 1..N
    base_step: int = 0
    max_memory: int = 1 << 30  # bytes, or a size such as "1GiB" / "500MB"
    overwrite: bool = False
    push_to_hub: str | None = None  # repo id to push the adapter to, or null
    hub_private: bool = False  # with push_to_hub: create that repo private

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be an integer rank >= 1 or an energy share in (0, 1], got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be at least 1 as an integer rank, got {value}")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"as an energy share must lie in (0, 1], got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"must be auto, cpu or cuda[:i], got {value!r}")
        return value

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"must increase strictly, got {value}")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> int:
        size = _size(value)
        if size < MIN_MEMORY:
            raise ValueError(f"must be at least {MIN_MEMORY >> 20} MiB, got {value!r}")
        return size

    @field_validator("push_to_hub")
    @classmethod
    def _push(cls, value: str | None) -> str | None:
        return _repo_id(value)

    @model_validator(mode="after")
    def _inputs(self) -> ExtractStage:
        if (self.checkpoints is None) == (self.run_dir is None):
            raise ValueError("give exactly one of checkpoints (a list) or run_dir (a run folder)")
        if self.steps is not None and self.checkpoints is not None and len(self.steps) != len(self.checkpoints):
            raise ValueError(f"steps gives {len(self.steps)} steps for {len(self.checkpoints)} checkpoints")
        return self


class ApplyStage(BaseModel):
    """``driftmerge apply``: write the model (or a scaled adapter) at a scale or step along the drift."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str | None = Field(default=None, min_length=1)  # default: the extract stage's output
    base: str | None = Field(default=None, min_length=1)  # default: the base recorded in the adapter
    scale: float | None = None  # W = W0 + scale · drift; exactly one of scale / step
    step: float | None = None  # a training step, mapped to a scale through the recorded steps
    output: str | None = Field(default=None, min_length=1)  # default: driftmerge-model / driftmerge-adapter-scaled
    format: Literal["model", "adapter"] = "model"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    push_to_hub: str | None = None  # repo id to push the output to, or null
    hub_private: bool = False  # with push_to_hub: create that repo private

    @field_validator("scale", "step")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard(cls, value: Any) -> str | int:
        if _size(value) < 1:
            raise ValueError(f"must be a positive size such as 5GB, got {value!r}")
        return value

    @field_validator("push_to_hub")
    @classmethod
    def _push(cls, value: str | None) -> str | None:
        return _repo_id(value)

    @model_validator(mode="after")
    def _one_target(self) -> ApplyStage:
        if (self.scale is None) == (self.step is None):
            raise ValueError("give exactly one of scale or step")
        if self.output is None:
            self.output = "driftmerge-model" if self.format == "model" else "driftmerge-adapter-scaled"
        return self


class PushStage(BaseModel):
    """Upload a folder to the Hugging Face Hub (:func:`driftmerge.hub.publish.push_folder`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    folder: str | None = Field(default=None, min_length=1)  # default: the apply output, else the extract output
    repo_id: str  # org/name (created when missing)
    private: bool = False  # create the repo private
    revision: str | None = Field(default=None, min_length=1)  # branch to push to (default: main)
    create_pr: bool = False  # open a pull request instead of committing
    dry_run: bool = False  # say what would be uploaded, upload nothing
    analysis: str | None = Field(default=None, min_length=1)  # a `driftmerge analyze` folder to add to the card

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str) -> str:
        return str(_repo_id(value))


class Recipe(BaseModel):
    """A job: up to three stages, run in the order extract, apply, push."""

    model_config = ConfigDict(extra="forbid", strict=True)

    extract: ExtractStage | None = None
    apply: ApplyStage | None = None
    push: PushStage | None = None

    @model_validator(mode="after")
    def _wire(self) -> Recipe:
        if self.extract is None and self.apply is None and self.push is None:
            raise ValueError("give at least one stage: extract, apply or push")
        if self.apply is not None and self.apply.adapter is None:
            if self.extract is None:
                raise ValueError("apply.adapter: required when the recipe has no extract stage")
            self.apply.adapter = self.extract.output
        if self.push is not None and self.push.folder is None:
            if self.apply is not None:
                self.push.folder = self.apply.output
            elif self.extract is not None:
                self.push.folder = self.extract.output
            else:
                raise ValueError("push.folder: required when the recipe has no extract or apply stage")
        return self


def _size(value: Any) -> int:
    """``"1GiB"``, ``"500MB"`` or a byte count → bytes, as a pydantic ``ValueError`` when it is none of those."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a size such as 1GiB or 500MB, or a byte count, got {value!r}")
    try:
        return parse_size(value, "size")
    except InputError:
        raise ValueError(f"must be a size such as 1GiB or 500MB, or a byte count, got {value!r}") from None


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
        raise InputError(f"{path}: a recipe is a mapping of stages (extract, apply, push), got {_kind(data)}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _describe(err: Any) -> str:
    """One pydantic error as ``unknown key a.b (allowed: …)`` or ``a.b: what is wrong``."""
    loc, key = err["loc"], _dotted(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(model.model_fields)})" if model is not None else ""
        return f"unknown key {key}{allowed}"
    if err["type"] == "missing":
        return f"{key}: required key missing"
    if err["type"] == "model_type":
        return f"{key}: must be a mapping of keys, got {_kind(err['input'])}"
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
    if err["type"].endswith("_type"):  # a value of the wrong type: say what was given
        msg += f", got {_kind(err['input'])}"
    elif err["type"] == "literal_error":
        msg += f", got {err['input']!r}"
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


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


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
    args = ["extract", e.base]
    if e.run_dir is not None:
        r = e.run_dir
        args += ["--run-dir", r.path, *_flag("--every", r.every), *_flag("--last", r.last)]
        args += _flag("--steps-range", r.steps_range)
    else:
        args += e.checkpoints or []
    args += ["-o", e.output]
    for key in OPTION_KEYS:  # only what differs from the command's defaults (type too: rank 1.0 is not rank 1)
        value, default = getattr(e, key), ExtractStage.model_fields[key].default
        if value != default or type(value) is not type(default):
            args += _flag("--" + key.replace("_", "-"), _text(key, value))
    return _command(args, e.overwrite, e.push_to_hub, e.hub_private)


def _apply_line(a: ApplyStage) -> str:
    target = ["--scale", _number(a.scale)] if a.scale is not None else ["--step", _number(a.step)]
    args = ["apply", str(a.adapter), *_flag("--base", a.base), *target, "-o", str(a.output)]
    if a.format != "model":
        args += ["--format", a.format]
    if a.dtype != "auto":
        args += ["--dtype", a.dtype]
    if a.max_shard_size != "5GB":
        args += ["--max-shard-size", str(a.max_shard_size)]
    return _command(args, a.overwrite, a.push_to_hub, a.hub_private)


def _push_line(p: PushStage) -> str:
    args = ["push", str(p.folder), p.repo_id, *_flag("--revision", p.revision), *_flag("--analysis", p.analysis)]
    args += [flag for flag, on in (("--private", p.private), ("--create-pr", p.create_pr), ("--dry-run", p.dry_run))
             if on]  # fmt: skip
    return _command(args)


def _number(value: float | None) -> str:
    """``1.5`` / ``2000`` (not ``2000.0``), exact: ``repr`` round-trips a float."""
    assert value is not None
    return str(int(value)) if value.is_integer() else repr(value)


def _flag(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _text(key: str, value: Any) -> str:
    if key == "steps":
        return ",".join(map(str, value))
    if key == "max_memory":
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value % (1 << shift) == 0:
                return f"{value >> shift}{unit}"
    return str(value)


def _command(args: list[str], overwrite: bool = False, push_to_hub: str | None = None, private: bool = False) -> str:
    args = [*args, *(["--overwrite"] if overwrite else []), *_flag("--push-to-hub", push_to_hub)]
    return shlex.join(["driftmerge", *args, *(["--hub-private"] if push_to_hub and private else [])])


# ---- running ---------------------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, progress: Progress | None = None, command: str | None = None) -> list[StageResult]:
    """Run every stage in order; ``command`` (e.g. ``driftmerge run recipes/x.yaml``) goes in the model cards."""
    preflight(recipe)
    return [stage.run(progress, command) for stage in stages(recipe)]


def preflight(recipe: Recipe) -> None:
    """Before any stage runs, refuse an output folder that exists (without ``overwrite``) or that overlaps the
    extract stage's output, and a push (not a dry run) without a Hub token: a late stage must not fail after an
    early one has spent its time."""
    e, a, p = recipe.extract, recipe.apply, recipe.push
    if e is not None:
        _check_output("extract", e.output, e.overwrite, [])
    if a is not None:
        _check_output("apply", str(a.output), a.overwrite, [Path(e.output)] if e is not None else [])
    pushes = [e.push_to_hub if e else None, a.push_to_hub if a else None, p.repo_id if p and not p.dry_run else None]
    for repo_id in filter(None, pushes):
        from driftmerge.hub.publish import require_token

        require_token(repo_id)


def _check_output(stage: str, out: str, overwrite: bool, inputs: list[Path]) -> None:
    try:
        check_output_dir(Path(out), inputs, overwrite)
    except OutputError as exc:
        msg = str(exc).replace("pass --overwrite", f"set {stage}.overwrite: true in the recipe")
        raise OutputError(msg.replace("choose another -o", f"change {stage}.output")) from None


def _recorded(command: str | None, line: str) -> str:
    """What a model card records: the stage's own command line, under the recipe command when there is one."""
    return line if command is None else f"{command}\n# this stage: {line}"


def _run_extract(e: ExtractStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.commands.extract import ExtractOptions, extract

    checkpoints = e.checkpoints if e.checkpoints is not None else _from_run_dir(e.run_dir)  # type: ignore[arg-type]
    options = ExtractOptions(**{key: getattr(e, key) for key in OPTION_KEYS})
    result = extract(e.base, checkpoints, e.output, options, e.overwrite, progress,
                     _recorded(command, _extract_line(e)))  # fmt: skip
    pushed = _push_after(result.out_dir, e.push_to_hub, e.hub_private)
    return StageResult("extract", "PEFT adapter", result.out_dir, result, pushed)


def _from_run_dir(run_dir: RunDir) -> list[str]:
    from driftmerge.io.rundirs import discover, select

    return [str(f.path) for f in select(discover(run_dir.path), run_dir.every, run_dir.last, run_dir.steps_range)]


def _run_apply(a: ApplyStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.commands.apply import apply_drift

    result = apply_drift(str(a.adapter), str(a.output), a.scale, a.step, a.base, a.format, a.dtype, a.max_shard_size,
                         a.overwrite, progress, _recorded(command, _apply_line(a)))  # fmt: skip
    what = "model" if a.format == "model" else "scaled PEFT adapter"
    pushed = _push_after(result.out_dir, a.push_to_hub, a.hub_private)
    return StageResult("apply", what, result.out_dir, result, pushed)


def _push_after(folder: Path, repo_id: str | None, private: bool) -> Any:
    """``push_to_hub``: push what the stage wrote, as ``--push-to-hub`` does (None without one)."""
    if repo_id is None:
        return None
    from driftmerge.hub.publish import push_folder  # the Hub client loads only when a recipe pushes

    return push_folder(folder, repo_id, private=private)


def _run_push(p: PushStage, progress: Progress | None, command: str | None) -> StageResult:
    from driftmerge.hub.publish import push_folder

    folder = Path(str(p.folder))
    result = push_folder(folder, p.repo_id, private=p.private, revision=p.revision, create_pr=p.create_pr,
                         dry_run=p.dry_run, analysis=p.analysis)  # fmt: skip
    return StageResult("push", "Hub upload", folder, result)
