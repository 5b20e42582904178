"""Open a base model or checkpoint folder read-only, list its tensors and read them lazily, parse steps.

A folder holds one of: ``model.safetensors``; sharded ``model-*.safetensors`` with ``model.safetensors.index.json``;
legacy ``pytorch_model.bin`` or sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json`` (loaded with
``weights_only=True`` and memory-mapped where the file allows). Nothing is read until a tensor is asked for, and
only the shard that holds it is opened.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from driftmerge.errors import InputError
from driftmerge.hub.refs import Resolved, resolve

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
MODEL_WEIGHTS = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)  # a folder holding one of these is a model

_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # as stored
    dtype: torch.dtype  # storage dtype
    file: str  # weight file name inside the folder

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A local Hugging Face model folder, opened read-only.

    ``infos`` maps every tensor name to its shape, dtype and file (read from the headers / index only);
    ``get(name)`` reads one tensor. Shard handles stay open between reads; safetensors memory-maps the file, and
    the pages a read touches count as this process's memory until the map closes, so a handle is closed (and
    reopened on the next read) once ``release_after`` bytes have been read through it. Reading a model tensor by
    tensor therefore never holds the whole file; a caller streaming many checkpoints at once lowers
    ``release_after`` so that all their maps together stay small.

    Thread safety: ``get``, ``probe``, ``close`` and ``release_after`` may be used from several threads at once (a
    read-ahead thread and the main thread): one lock guards the open handles, the bytes read through each and
    ``release_after``, and is held while a handle reads, so no handle is used by two threads at once. ``infos``,
    ``format`` and ``config`` are not changed after construction; ``hub`` and ``label`` are set once, before reading.
    """

    RELEASE_AFTER = 256 << 20  # default of ``release_after``

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or folder")
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a folder (give the model folder, not a weight file)")
        self.format, files = _weight_files(self.path)
        self.config: dict[str, Any] | None = _read_json(self.path / "config.json")
        self._lock = threading.RLock()  # guards _handles, _read_through, _release_after and the use of a handle
        self._handles: dict[str, Any] = {}
        self._read_through: dict[str, int] = {}  # bytes read through each open handle
        self._release_after = self.RELEASE_AFTER
        self.hub: dict[str, Any] | None = None  # {"repo_id", "revision", "commit"} when it came from the Hub
        self.label = str(self.path)  # what its step is read from
        self.infos: dict[str, TensorInfo] = {}
        with self._lock:  # no other thread sees this object yet; held so that _open always runs under it
            for fname, names in files.items():
                self._index_file(fname, names)
        if not self.infos:
            raise InputError(f"{self.path}: the weight files hold no tensors; re-save the model (save_pretrained)")

    # ---- listing ---------------------------------------------------------------------------------------------
    def _index_file(self, fname: str, expected: set[str] | None) -> None:
        fpath = self.path / fname
        if not fpath.is_file():
            raise InputError(f"{self.path}: the index names {fname}, which is missing; copy that shard or re-save")
        handle = self._open(fname)
        if self.format == "safetensors":
            names = list(handle.keys())
            for name in names:
                sl = handle.get_slice(name)
                dtype = _SAFE_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise InputError(
                        f"{fpath}: tensor {name} has unsupported dtype {sl.get_dtype()}; save it in bf16, fp16 or fp32"
                    )
                self.infos[name] = TensorInfo(tuple(sl.get_shape()), dtype, fname)
        else:
            for name, t in handle.items():
                if isinstance(t, torch.Tensor):
                    self.infos[name] = TensorInfo(tuple(t.shape), t.dtype, fname)
        if expected is not None:
            missing = sorted(expected - {n for n, i in self.infos.items() if i.file == fname})
            if missing:
                raise InputError(f"{fpath}: the index says it holds {missing[0]}, but it does not; re-save the model")

    @property
    def release_after(self) -> int:
        """Bytes read through a safetensors handle after which it is closed (its file map released)."""
        with self._lock:
            return self._release_after

    @release_after.setter
    def release_after(self, value: int) -> None:
        with self._lock:
            self._release_after = int(value)

    def _open(self, fname: str) -> Any:
        """The open handle of ``fname`` (opened now if need be). Call with ``self._lock`` held."""
        if fname in self._handles:
            return self._handles[fname]
        fpath = self.path / fname
        handle: Any
        try:
            if self.format == "safetensors":
                handle = safe_open(str(fpath), framework="pt", device="cpu")
            else:
                handle = _load_bin(fpath)
        except Exception as exc:  # any unreadable file: truncated, corrupt header, not a weight file
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"{fpath}: cannot read the weights ({msg}); the file is damaged or incomplete, copy or save it again"
            ) from exc
        self._handles[fname] = handle
        return handle

    # ---- reading ---------------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor as stored (dtype and shape of the file). Safe to call from several threads at once."""
        info = self.infos.get(name)
        if info is None:
            raise InputError(f"{self.path}: no tensor named {name}")
        with self._lock:
            handle = self._open(info.file)
            try:
                tensor = handle.get_tensor(name) if self.format == "safetensors" else handle[name]
            except Exception as exc:  # a truncated or corrupt file surfaces only when the bytes are read
                raise InputError(
                    f"{self.path / info.file}: cannot read tensor {name} ({exc}); the file is damaged or incomplete,"
                    " copy or save it again"
                ) from exc
            if self.format == "safetensors":  # the tensor holds its own reference to the map: the handle may close
                read = self._read_through.get(info.file, 0) + info.numel * info.dtype.itemsize
                self._read_through[info.file] = read
                if read >= self._release_after:
                    del self._handles[info.file], self._read_through[info.file]
        return tensor

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weight files (the size of the checkpoint on disk)."""
        return sum((self.path / f).stat().st_size for f in {i.file for i in self.infos.values()})

    def signature(self) -> str:
        """sha256 over every tensor's name, shape and dtype: equal for folders of the same architecture."""
        h = hashlib.sha256()
        for name in sorted(self.infos):
            info = self.infos[name]
            h.update(f"{name}:{list(info.shape)}:{info.dtype};".encode())
        return h.hexdigest()

    def probe(self, count: int = 3) -> str:
        """sha256 over the bytes of the ``count`` smallest floating-point tensors: tells two sets of weights apart."""
        small = sorted((i.numel, n) for n, i in self.infos.items() if i.dtype.is_floating_point)[:count]
        h = hashlib.sha256()
        for _, name in small:
            h.update(name.encode())
            h.update(self.get(name).float().numpy().tobytes())
        return h.hexdigest()

    def close(self) -> None:
        """Close every open handle (a later ``get`` opens its shard again)."""
        with self._lock:
            self._handles.clear()
            self._read_through.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.infos)} tensors, {self.format})"


def _weight_files(path: Path) -> tuple[str, dict[str, set[str] | None]]:
    """Return (format, {file name: tensor names it should hold or None}) for a model folder."""
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index_path = path / index_name
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = (index or {}).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index_path}: no weight_map in the index; re-save the model (save_pretrained)")
            by_file: dict[str, set[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, set()).add(name)
            return fmt, dict[str, set[str] | None](by_file)
    if (path / SAFE_SINGLE).is_file():
        return "safetensors", {SAFE_SINGLE: None}
    if (path / BIN_SINGLE).is_file():
        return "bin", {BIN_SINGLE: None}
    raise InputError(
        f"{path}: no model weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def _load_bin(fpath: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(fpath, map_location="cpu", weights_only=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); fix the file or save the model again") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; fix the file or save the model again")
    return data


# ---- checks across checkpoints ------------------------------------------------------------------------------
def check_compatible(base: Checkpoint, checkpoints: Sequence[Checkpoint]) -> None:
    """Every checkpoint must hold the base's tensors with the base's shapes (checked from headers only)."""
    for ckpt in checkpoints:
        if ckpt.path.resolve() == base.path.resolve():
            raise InputError(f"{ckpt.path}: this checkpoint is the base folder itself; list the base once, first")
        missing = sorted(set(base.infos) - set(ckpt.infos))
        extra = sorted(set(ckpt.infos) - set(base.infos))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the base lacks"
            n = len(missing) + len(extra)
            more = f" ({n} tensors differ)" if n > 1 else ""
            raise InputError(f"{ckpt.path}: {what}{more}; base and checkpoints must be the same architecture")
        for name, info in base.infos.items():
            other = ckpt.infos[name].shape
            if other != info.shape:
                hint = "base and checkpoints must come from the same model"
                if len(other) == 2 and other[1:] == info.shape[1:]:
                    hint = f"different vocabularies ({other[0]} rows against {info.shape[0]})? {hint} and vocabulary"
                raise InputError(
                    f"{ckpt.path}: tensor {name} has shape {list(other)}, the base has {list(info.shape)}; {hint}"
                )


def open_run(
    base: str | Path, checkpoints: Sequence[str | Path], *, steps: Sequence[int] | None, base_step: int
) -> tuple[Checkpoint, list[Checkpoint], list[int], str]:
    """Open a base and its checkpoints, order the checkpoints by step and check they match the base.

    Any of them may be a Hub reference (``org/name[@rev]``, see :mod:`driftmerge.hub.refs`). Returns (base, checkpoints
    in step order, their steps, where the steps came from).
    """
    base_ck = open_ref(base)
    cks = [open_ref(p) for p in checkpoints]
    found, order, source = resolve_steps([c.label for c in cks], steps, base_step=base_step)
    cks = [cks[i] for i in order]
    check_compatible(base_ck, cks)
    return base_ck, cks, found, source


def open_ref(ref: str | Path, resolved: Resolved | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a local folder or a Hub reference, which it remembers as ``.hub``."""
    r = resolved or resolve(ref)
    ck = Checkpoint(r.path)
    ck.hub, ck.label = r.hub, r.label
    return ck


# ---- steps ---------------------------------------------------------------------------------------------------
_TRAILING_INT = re.compile(r"(\d+)$")
_WRAPPER_DIRS = {"huggingface", "hf", "actor"}  # verl: global_step_N/actor/huggingface


def step_from_path(path: str | Path) -> int | None:
    """The trailing integer of a checkpoint folder's name (``checkpoint-500``, ``global_step_500``, ``step500``).

    verl's ``global_step_N/actor/huggingface`` is read through its wrapper folders. None when there is none.
    """
    for part in reversed(Path(path).resolve().parts):
        if part.lower() in _WRAPPER_DIRS:
            continue
        m = _TRAILING_INT.search(part)
        return int(m.group(1)) if m else None
    return None


def resolve_steps(
    paths: Sequence[str | Path], steps: Sequence[int] | None, *, base_step: int = 0
) -> tuple[list[int], list[int], str]:
    """Decide the step of each checkpoint. Returns (steps, order, source).

    ``order`` lists checkpoint indices by increasing step: folder names are sorted by their step (a shell glob
    sorts ``checkpoint-1000`` before ``checkpoint-200``), while explicit ``--steps`` must already increase.
    """
    n = len(paths)
    if steps is not None:
        if len(steps) != n:
            k = len(steps)
            raise InputError(f"--steps gives {k} step{'s' * (k != 1)} for {n} checkpoint{'s' * (n != 1)}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise InputError(f"--steps must increase strictly, got {','.join(map(str, steps))}")
        found, source = list(steps), "--steps"
    else:
        parsed = [step_from_path(p) for p in paths]
        known = [s for s in parsed if s is not None]
        if len(known) == n and len(set(known)) == n:
            found, source = known, "folder names"
        elif all(s is not None for s in parsed):
            dup = next(s for s in parsed if parsed.count(s) > 1)
            raise InputError(f"two checkpoints have step {dup} in their folder names; give --steps")
        else:
            found, source = [base_step + i for i in range(1, n + 1)], "order given (1..N)"
    order = sorted(range(n), key=lambda i: found[i])
    first = found[order[0]]
    if first <= base_step:
        raise InputError(f"checkpoint step {first} is not after the base step {base_step} (see --base-step)")
    return [found[i] for i in order], order, source
