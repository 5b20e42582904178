"""``driftmerge.json`` as typed models: what an adapter records about how it was made (inputs, steps, options,
per-tensor facts, summary).

It sits in the lowest layer (pydantic only) because the Hub cards and the push read it as well as ``io`` and the
commands; :mod:`driftmerge.io.metadata` builds it from an extraction. Fields are declared in the order ``extract``
writes them, and :meth:`DriftMeta.to_json` is ``json.dumps(model, indent=2)``: the same inputs give the same bytes.

Versions: ``format_version`` changes only when the written JSON does. A reader takes every version up to
:data:`FORMAT_VERSION` (a version 1 file written before a key existed reads it as its default) and refuses a newer
one in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs this one below Python 3.12

from driftmerge.errors import InputError

FORMAT_VERSION = 1
META = "driftmerge.json"


@with_config(ConfigDict(extra="forbid"))
class HubEntry(TypedDict):
    """Where an input came from on the Hub (a plain dict: :mod:`driftmerge.hub.refs` makes and reads it)."""

    repo_id: str
    revision: str | None
    commit: str


class _Record(BaseModel):
    """Unknown keys are errors; the fields named in ``omit_none`` are left out of the JSON while None (absent)."""

    model_config = ConfigDict(extra="forbid")
    omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omit_none}


class BaseRecord(_Record):
    """The base model: its path, step, architecture signature, weight probe, license and Hub origin (a Hub input, or
    a local folder that is a snapshot in the Hugging Face cache), and the Hub id ``--base-model`` gave for it."""

    omit_none = frozenset({"hub", "repo_id"})
    ref: str
    step: int
    signature: str | None = None  # sha256 of tensor names, shapes, dtypes (absent in the earliest version 1 files)
    probe: str | None = None  # sha256 of the smallest tensors' bytes
    license: str | None = None
    hub: HubEntry | None = None
    repo_id: str | None = None  # --base-model: the base's Hub repo id as the user gave it (its commit unknown)

    @property
    def hub_id(self) -> str | None:
        """The base's Hub repo id for cards and PEFT: ``--base-model`` when given, else its Hub origin's, else None
        (a local folder: only ``ref`` finds it)."""
        return self.repo_id or (self.hub["repo_id"] if self.hub else None)


class CheckpointRecord(_Record):
    omit_none = frozenset({"hub"})
    ref: str
    step: int
    hub: HubEntry | None = None


class TensorRecord(_Record):
    """One fitted tensor: ``stored`` says where its drift went (LoRA factors of ``module``, the extras, or nowhere
    because it did not move); ``energy`` is the share of ``‖D‖_F²`` the stored drift keeps."""

    omit_none = frozenset({"module", "experts", "expert", "rows", "transposed", "nest"})
    shape: list[int]
    kind: str  # "linear" | "embedding" | "conv1d" | "param" | "experts" | "other"
    drift_norm: float  # ‖D‖_F
    r2: float | None = None  # pooled R² of the line; None with fewer than 2 checkpoints
    stored: Literal["lora", "extras", "zero"]
    module: str | None = None  # PEFT target of the LoRA factors: a module path, or a parameter path (param, experts)
    rank: int | None = None  # lora: the rank; extras: the rank of the stored factors (None: stored full-rank)
    energy: float | None = None
    experts: int | None = None  # experts: E, the number of experts in the stack
    expert: int | None = None  # experts: which expert of the stack this tensor is (None: the whole 3-D stack)
    rows: list[int] | None = None  # experts: [start, stop) rows of that expert's (out, in) matrix it fills
    transposed: bool | None = None  # experts: the stack is stored (E, in, out)
    nest: int | None = None  # param, experts: how many `base_layer.` PEFT puts before this parameter's LoRA keys

    @model_validator(mode="after")
    def _lora_names_its_module(self) -> TensorRecord:
        if self.stored == "lora" and self.module is None:
            raise ValueError("a tensor stored as lora needs its module")
        return self


class Summary(_Record):
    """Totals over the tensors: ``energy_kept = Σ_lora e_i ‖D_i‖² / Σ_lora ‖D_i‖²``, ``extras_share = Σ_extras
    ‖D_i‖² / Σ_(lora+extras) ‖D_i‖²``."""

    tensors: int
    lora_tensors: int
    extras_tensors: int
    extras_kinds: dict[str, int] = Field(default_factory=dict)  # what the extras hold: "norm", "bias", "factored"…
    zero_tensors: list[str]
    rank_min: int
    rank_max: int
    energy_kept: float
    extras_share: float
    median_r2: float | None
    checkpoint_bytes: int
    base_bytes: int
    adapter_bytes: int = Field(default=0, exclude=True)  # set by extract after writing; not in driftmerge.json


class DriftMeta(_Record):
    """``driftmerge.json``. ``scale`` and ``scaled_from`` are there only in an adapter written by
    ``apply --format adapter`` (which also replaces ``command``)."""

    omit_none = frozenset({"scale", "scaled_from"})
    format_version: int
    driftmerge_version: str
    base: BaseRecord
    checkpoints: list[CheckpointRecord] = Field(min_length=1)
    steps_source: str
    base_step: int
    s_ref: int  # the step of scale 1 (the last checkpoint)
    fit: str
    rank_rule: int | float
    svd: str
    seed: int
    niter: int
    oversample: int
    max_memory: int | None = None  # absent in version 1 files written before the memory budget
    device: str
    factor_dtype: str | None
    storage_dtype: str | None
    adapter_dtype: str
    include: str | None
    exclude: str | None
    architecture_source: str
    fan_in_fan_out: bool
    tied: dict[str, str]
    command: str | None
    tensors: dict[str, TensorRecord]
    summary: Summary
    scale: float | None = None
    scaled_from: str | None = None

    def to_json(self) -> str:
        """The file's text: ``json.dumps`` with ``indent=2`` and a final newline."""
        return json.dumps(self.model_dump(), indent=2) + "\n"


def parse_meta(raw: Any, source: str | Path) -> DriftMeta:
    """The loaded JSON of ``source`` as a :class:`DriftMeta`; one :class:`InputError` line naming the file and the key
    for a newer, unknown or invalid file."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: holds a {type(raw).__name__}, not the object {META} holds; run driftmerge extract")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InputError(
            f"{source}: format_version {version} is newer than this driftmerge reads (up to {FORMAT_VERSION});"
            " upgrade driftmerge (pip install -U driftmerge)"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{source}: unsupported format_version {version!r}; extract it again with this driftmerge")
    try:
        return DriftMeta.model_validate(raw, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(
            f"{source}: {_key(raw, err['loc'], err['type'] == 'missing')}: {err['msg'].lower()}; run driftmerge extract"
            " again"
        ) from exc


def read_meta(path: str | Path) -> DriftMeta:
    """Read and check a ``driftmerge.json`` file (see :func:`parse_meta`)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it ({str(exc).splitlines()[0]}); run driftmerge extract again") from exc
    return parse_meta(raw, path)


def _key(raw: Any, loc: tuple[int | str, ...], missing: bool) -> str:
    """A pydantic error location as the key path in ``raw``: ``tensors["model.norm.weight"].shape``,
    ``checkpoints[0].step`` (without the union member names pydantic appends; with the key itself when missing)."""
    out, node = "", raw
    for part in loc:
        found = (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int))
        if not found and not missing:
            break
        node = node[part] if found else None
        if isinstance(part, int) or "." in part:
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else part
    return out or "the top level"
