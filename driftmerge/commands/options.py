"""The options of ``extract`` and ``apply``, defined once.

The library takes these models (``extract(..., options=ExtractOptions(rank=2))``, ``apply_drift(...,
options=ApplyOptions(scale=1.5))``); the CLI's flags are generated from their fields (``driftmerge_cli.options``);
a recipe's ``extract`` and ``apply`` stages are these models plus the stage's own keys
(:mod:`driftmerge.commands.recipe_schema`), and a recipe's equivalent command line is written back from them.
Each field carries its default, its one rule, and a :class:`~driftmerge.commands.flags.Flag`: its name on the
command line, help text, metavar, and how command-line text becomes a value and back (:mod:`driftmerge.commands.flags`).

A bad value is one line naming what the user wrote: ``--rank must be …`` on the command line and in the library
(an ``OptionsError``, which is an ``InputError``), ``extract.rank: must be …`` in a recipe. Loads neither torch
nor click.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from driftmerge.commands.flags import Conflict, Flag, OptionsError, OptionsModel
from driftmerge.core.device_names import DEVICE_CHOICES, is_device
from driftmerge.errors import InputError
from driftmerge.hub.refs import is_repo_id
from driftmerge.io.memory import parse_size
from driftmerge.io.rundirs import Found, discover, parse_range, select

MIN_MEMORY = 64 << 20  # the smallest --max-memory / max_memory (bytes): below it every read would wait
ADAPTER_DIR = "driftmerge-adapter"  # extract's output folder, and apply's adapter, by default
APPLY_OUTPUTS = {"model": "driftmerge-model", "adapter": "driftmerge-adapter-scaled"}  # apply's output by format
APPLY_WRITES = {"model": "model", "adapter": "scaled PEFT adapter"}  # what apply writes, by format


# ---- the rules -------------------------------------------------------------------------------------------------
def _rank(value: Any) -> int | float:
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0.0 < value <= 1.0)
    )
    if not ok:
        raise ValueError(f"must be an integer rank of at least 1 or an energy share in (0, 1], got {value!r}")
    return value


def _increasing(value: list[int] | None) -> list[int] | None:
    if value is not None and any(b <= a for a, b in itertools.pairwise(value)):
        raise ValueError(f"must increase strictly, got {value}")
    return value


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _device(value: str) -> str:
    if not is_device(value):
        raise ValueError(f"must be {DEVICE_CHOICES}, got {value!r}")
    return value


def _regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"must be a valid regular expression ({exc}), got {value!r}") from None
    return value


def _size(value: Any) -> int:
    """``"1GiB"``, ``"500MB"`` or a byte count → bytes."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a size such as 1GiB or 500MB, or a byte count, got {value!r}")
    try:
        return parse_size(value, "size")
    except InputError:
        raise ValueError(f"must be a size such as 1GiB or 500MB, or a byte count, got {value!r}") from None


def _memory(value: Any) -> int:
    size = _size(value)
    if size < MIN_MEMORY:
        got = f"{value} bytes" if isinstance(value, int) else repr(value)
        raise ValueError(f"must be at least {MIN_MEMORY >> 20} MiB, got {got}")
    return size


def _shard_size(value: Any) -> Any:
    if _size(value) < 1:
        raise ValueError(f"must be a positive size such as 5GB, got {value!r}")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _steps_range(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_range(value)
        except InputError:
            raise ValueError(f"must be A:B, A: or :B with integer steps, A <= B, got {value!r}") from None
    return value


def repo_id_rule(value: str | None) -> str | None:
    """A Hub repo id ``NAMESPACE/NAME`` (:func:`~driftmerge.hub.refs.is_repo_id`), or None; the rule of
    ``--base-model`` and of a recipe's ``push_to_hub`` and ``push.repo_id``."""
    if value is not None and not is_repo_id(value):
        raise ValueError(f"must be a Hub repo id NAMESPACE/NAME (no @revision here), got {value!r}")
    return value


def _path_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# ---- command-line text ↔ value ---------------------------------------------------------------------------------
def parse_rank(text: str) -> int | float:
    """``--rank`` text: ``8`` (a fixed rank) or ``0.9`` (an energy share); ValueError when it is neither."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    raise ValueError(f"{text!r} is neither an integer rank nor an energy share like 0.9")


def parse_steps(text: str) -> list[int]:
    """``--steps`` text: ``100,200,300``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integer steps") from None


def parse_size_text(text: str) -> int:
    """``--max-memory`` text: ``2GiB``, ``500MB`` or a byte count → bytes."""
    try:
        return parse_size(text, "size")
    except InputError as exc:
        raise ValueError(str(exc).removeprefix("size: ")) from None


def _steps_text(steps: list[int]) -> str:
    return ",".join(map(str, steps))


def _size_text(size: int) -> str:
    """``4GiB`` where the size is a whole number of GiB (MiB, KiB), else the byte count."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def _number_text(value: float) -> str:
    """``1.5`` / ``2000`` (not ``2000.0``), exact: ``repr`` round-trips a float."""
    return str(int(value)) if value.is_integer() else repr(value)


# ---- the options -----------------------------------------------------------------------------------------------
class RunDirSelection(OptionsModel):
    """Take the checkpoints from a training run's folder: ``every`` keeps the steps that are multiples of K, then
    ``steps_range`` keeps A <= step <= B, then ``last`` keeps the last N (:mod:`driftmerge.io.rundirs`)."""

    # TRL output_dir (checkpoint-N/), verl (global_step_N/actor/huggingface/), step_N/
    path: Annotated[
        str,
        Field(min_length=1),
        Flag("--run-dir", "Take the checkpoints from a run folder (TRL, verl, step_N/) instead.", "DIR"),
    ]
    every: Annotated[
        int | None, Field(ge=1), Flag("--every", "With --run-dir: only steps that are multiples of K.", "K")
    ] = None
    last: Annotated[int | None, Field(ge=1), Flag("--last", "With --run-dir: only the last N checkpoints.", "N")] = None
    steps_range: Annotated[
        str | None,
        AfterValidator(_steps_range),
        Flag("--steps-range", "With --run-dir: only steps A..B (A: or :B leave a side open).", "A:B"),
    ] = None

    def select(self) -> tuple[list[Found], list[Found]]:
        """The checkpoints taken, and all those found in the run folder, in step order."""
        found = discover(self.path)
        return select(found, every=self.every, last=self.last, steps_range=self.steps_range), found


class ExtractOptions(OptionsModel):
    """How ``extract`` fits the drift and factorizes it (docs/design.md §2.2, §2.4, §5)."""

    steps: Annotated[  # checkpoint steps; default: from the folder names, else 1..N
        list[int] | None,
        Field(min_length=1),  # constraints before validators: they then hold for the list, not for None
        BeforeValidator(_as_list),
        AfterValidator(_increasing),
        Flag(
            "--steps",
            "Checkpoint steps, e.g. 100,200,300 [default: from folder names, else 1..N]",
            "S1,S2,...",
            parse=parse_steps,
            text=_steps_text,
        ),
    ] = None
    base_step: Annotated[int, Flag("--base-step", "Step of the base model.")] = 0
    rank: Annotated[  # int: a fixed rank; float in (0, 1]: the share of the drift energy to keep
        int | float,
        BeforeValidator(_rank),
        Flag("--rank", "Rank K, or an energy share like 0.9.", "RANK", parse=parse_rank),
    ] = 1
    fit: Annotated[
        Literal["lsq", "pca", "endpoint"],
        Flag(
            "--fit",
            "lsq: least-squares line through the base; pca: RELEX rank-1 trajectory; endpoint: last delta.",
        ),
    ] = "lsq"
    svd: Annotated[
        Literal["randomized", "exact"],
        Flag("--svd", "Factorization: seeded randomized subspace iteration, or a full SVD for reference."),
    ] = "randomized"
    device: Annotated[  # where the fit and the factorization run
        str,
        AfterValidator(_device),
        Flag("--device", f"{DEVICE_CHOICES}: where the fit and the factorization run."),
    ] = "auto"
    factor_dtype: Annotated[  # the sketching matmuls' dtype (core.devices.resolve_factor_dtype)
        Literal["auto", "float32", "bfloat16", "float16"],
        Flag(
            "--factor-dtype",
            "Dtype of the sketching matmuls (float32 accumulate; singular values from a float32 product). "
            "auto: bfloat16 where the device multiplies it natively (CUDA sm80+, AVX512-BF16/AMX CPUs), else "
            "float32.",
        ),
    ] = "auto"
    include: Annotated[  # regex: only tensors whose name matches (re.search)
        str | None, AfterValidator(_regex), Flag("--include", "Only fit tensors whose name matches.", "REGEX")
    ] = None
    exclude: Annotated[  # regex: leave out tensors whose name matches
        str | None,
        AfterValidator(_regex),
        Flag("--exclude", "Leave out tensors whose name matches (the base is kept for them).", "REGEX"),
    ] = None
    seed: Annotated[int, Flag("--seed", "Seed of the randomized factorization.")] = 0
    niter: Annotated[
        int,
        Field(ge=0),
        Flag(
            "--niter",
            "Power iterations of the randomized factorization, at least (more until it settles).",
            hidden=True,
        ),
    ] = 1
    oversample: Annotated[
        int, Field(ge=0), Flag("--oversample", "Extra sketch columns of the randomized factorization.", hidden=True)
    ] = 8
    max_memory: Annotated[  # bytes: read-ahead plus drift matrices awaiting factorization (docs/design.md §5)
        int,
        BeforeValidator(_memory),
        Flag(
            "--max-memory",
            "Budget for read-ahead and drift matrices awaiting factorization; peak use adds a few copies of the "
            "largest tensor. Changes speed, never the result.",
            "SIZE",
            parse=parse_size_text,
            text=_size_text,
        ),
    ] = 1 << 30
    guess_modules: Annotated[  # without a model skeleton, take 2-D *.weight tensors as Linear layers by name
        bool,
        Flag(
            "--guess-modules",
            "When transformers cannot build the model from config.json, take 2-D *.weight tensors as Linear "
            "layers by name (wrong for Conv1D and custom layers; check the adapter with PEFT).",
        ),
    ] = False
    trust_remote_code: Annotated[  # build auto_map models with their own code to map tensors to modules
        bool,
        Flag("--trust-remote-code", "Build a custom-code (auto_map) model with its own code to map its layers."),
    ] = False
    base_model: Annotated[  # the base's Hub id for the card and adapter_config.json (driftmerge.json keeps its path)
        str | None,
        AfterValidator(repo_id_rule),
        Flag(
            "--base-model",
            "The base's Hub id, for the model card and PEFT's adapter_config.json [default: the base's own, or the "
            "one its Hugging Face cache folder shows; none for another local folder].",
            "REPO_ID",
        ),
    ] = None


class ApplyOptions(OptionsModel):
    """Where along the drift ``apply`` writes (exactly one of ``scale`` and ``step``), and in which form."""

    OUTPUT_AFTER: ClassVar[str | None] = "step"

    base: Annotated[  # default: the base recorded in the adapter's driftmerge.json
        str | None,
        Field(min_length=1),
        BeforeValidator(_path_text),
        Flag("--base", "Base model folder [default: the one recorded in the adapter's driftmerge.json]"),
    ] = None
    scale: Annotated[  # W = W0 + scale · drift
        float | None,
        AfterValidator(_finite),
        Flag("--scale", "W = W0 + scale · drift (1 = the last checkpoint, >1 extrapolates).", text=_number_text),
    ] = None
    step: Annotated[  # a training step, mapped to a scale through the recorded steps
        float | None,
        AfterValidator(_finite),
        Flag("--step", "Target training step; mapped to a scale through the recorded steps.", text=_number_text),
    ] = None
    format: Annotated[
        Literal["model", "adapter"],
        Flag(
            "--format",
            "model: a full Hugging Face model; adapter: a PEFT adapter with the scale baked into lora_alpha.",
        ),
    ] = "model"
    dtype: Annotated[
        Literal["auto", "bfloat16", "float16", "float32"],
        Flag("--dtype", "Storage dtype of the model (auto = the base's)."),
    ] = "auto"
    max_shard_size: Annotated[
        str | int, BeforeValidator(_shard_size), Flag("--max-shard-size", "Largest safetensors shard.")
    ] = "5GB"
    allow_negative_scale: Annotated[  # a scale below 0 (a step before the base's) moves against training
        bool,
        Flag(
            "--allow-negative-scale",
            "Allow a scale below 0 (a step before the base's): it moves the base against the training, which is "
            "refused unless asked for. For a point part way along the run give --scale in [0, 1] or --step.",
        ),
    ] = False
    allow_other_base: Annotated[  # a --base whose weights differ from the recorded base (a checkpoint, say)
        bool,
        Flag(
            "--allow-other-base",
            "Allow a --base whose weights differ from those the drift was fitted from; refused unless asked for, "
            "since on a checkpoint of the run W0 + s·drift counts the drift it already holds twice.",
        ),
    ] = False

    @model_validator(mode="after")
    def _one_target(self) -> ApplyOptions:
        if (self.scale is None) == (self.step is None):
            raise Conflict("give exactly one of {scale} or {step}")
        return self

    def check_direction(self, scale: float, step: float | None = None) -> None:
        """Refuse a scale below 0 (``step`` before the base's) unless ``allow_negative_scale``: ``W0 + s · drift``
        with ``s < 0`` moves the base against the training, which no one wants by accident."""
        if scale < 0 and not self.allow_negative_scale:
            asked = f"--step {step:g} (scale {scale:g})" if self.scale is None else f"--scale {scale:g}"
            raise OptionsError(
                f"{asked} moves the base against the training (scale 1 = the last checkpoint); for a point part way"
                " along the run give --scale in [0, 1] or a --step after the base's, or pass --allow-negative-scale"
                " (allow_negative_scale: true in a recipe) to go there on purpose"
            )

    @property
    def default_output(self) -> str:
        """The output folder when none is given: ``driftmerge-model`` or ``driftmerge-adapter-scaled``."""
        return APPLY_OUTPUTS[self.format]

    @property
    def writes(self) -> str:
        """What apply writes: ``model`` or ``scaled PEFT adapter``."""
        return APPLY_WRITES[self.format]
