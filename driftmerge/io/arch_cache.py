"""A disk cache of what a model's skeleton said about its checkpoint tensors (:mod:`driftmerge.io.skeleton`).

Building the skeleton imports transformers' modeling code (3–5 s on 2 cores, most of an extract of a small MoE),
yet its answer depends only on the config, the checkpoint's keys and shapes, and the versions of transformers and
driftmerge. That answer is kept as JSON under ``$DRIFTMERGE_CACHE`` (default ``~/.cache/driftmerge``;
``DRIFTMERGE_CACHE=off`` turns the cache off) in ``architectures/<sha256 of all of it>.json``, written
atomically. Models with custom code (``auto_map``) are never cached: their code may change under the same
config. A cache that cannot be read or written is passed by, never an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from driftmerge import __version__
from driftmerge.io.targets import Architecture, Target

logger = logging.getLogger("driftmerge")

OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """Where architectures are cached, or None when ``DRIFTMERGE_CACHE`` turns the cache off."""
    where = os.environ.get("DRIFTMERGE_CACHE", "")
    if where.strip().lower() in OFF:
        return None
    root = Path(where).expanduser() if where else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return (root if where else root / "driftmerge") / "architectures"


def cache_key(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str:
    """sha256 of everything the skeleton's answer depends on."""
    try:
        tf = version("transformers")
    except PackageNotFoundError:
        tf = "none"
    blob = json.dumps(
        {
            "driftmerge": __version__,
            "transformers": tf,
            "config": config,
            "shapes": sorted((k, list(v)) for k, v in shapes.items()),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load(key: str) -> Architecture | None:
    """The cached :class:`Architecture` for ``key``, or None (no cache, no entry, or one that does not parse)."""
    root = cache_dir()
    if root is None:
        return None
    path = root / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        targets = {name: _target(t) for name, t in data.pop("targets").items()}
        arch = Architecture(targets=targets, **data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.info("architecture cache: %s unreadable (%s); building the skeleton", path, exc)
        return None
    logger.info("architecture: from the cache (%s)", path)
    return arch


def store(key: str, arch: Architecture) -> None:
    """Write ``arch`` for ``key`` (atomically: a temporary file renamed); any failure is logged and passed by."""
    root = cache_dir()
    if root is None:
        return
    path = root / f"{key}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dataclasses.asdict(arch)))
        os.replace(tmp, path)
    except OSError as exc:
        logger.info("architecture cache: could not write %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _target(fields: dict[str, Any]) -> Target:
    """A :class:`Target` from its JSON form (lists back to tuples)."""
    for name in ("dims", "rows"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    return Target(**fields)
