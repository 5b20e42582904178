"""Produce a model anywhere along the drift: ``W(scale) = W0 + scale · B A`` (``W0 + scale · D`` for extras).

``--step T`` maps to ``scale = (T - s_base) / (s_ref - s_base)``. A scale below 0 (against the training) and a base
with other weights than the recorded one (a checkpoint: its drift would count twice) are refused unless
``allow_negative_scale`` / ``allow_other_base``. The base streams tensor by tensor into
safetensors shards of at most ``max_shard_size`` bytes; config, generation config and tokenizer files are copied.
``format="adapter"`` writes a PEFT adapter with the scale baked into ``lora_alpha`` instead.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from driftmerge.commands.distributed import distributed
from driftmerge.commands.options import ApplyOptions
from driftmerge.core.devices import DTYPES
from driftmerge.core.drift import scale_and_step
from driftmerge.errors import InputError
from driftmerge.hub.cards import adapter_card
from driftmerge.io.adapter import Adapter, peft_config, scale_extra, write_adapter
from driftmerge.io.checkpoints import Checkpoint
from driftmerge.io.memory import parse_size
from driftmerge.io.model_writer import finish_model, out_bytes, plan_shards, shard_bytes, write_shards
from driftmerge.io.outputs import atomic_output_dir, check_output_dir
from driftmerge.io.sources import delta_sources, open_adapter, open_base
from driftmerge.progress import Progress

logger = logging.getLogger("driftmerge")


@dataclass
class ApplyResult:
    out_dir: Path
    scale: float
    step: float
    tensors_changed: int
    tensors_total: int
    shards: int
    bytes_written: int


def apply_drift(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    options: ApplyOptions,
    overwrite: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> ApplyResult:
    """Write the model (or the scaled adapter, ``options.format``) at ``options.scale`` (or at the training step
    ``options.step``) along the drift in ``adapter_dir`` to ``out_dir``, replacing it when ``overwrite``.
    ``command`` is recorded in the output; ``progress(done, total, name)`` follows tensors."""
    scale, step, dtype = options.scale, options.step, options.dtype
    adapter_ref = str(adapter_dir)
    adapter_dir, adapter = open_adapter(adapter_dir)
    meta = adapter.meta
    scale, step = scale_and_step(scale, step, base_step=meta.base_step, s_ref=meta.s_ref)
    options.check_direction(scale, step)  # below 0 only with allow_negative_scale
    if options.format == "adapter":  # a small folder: rank 0 writes it
        with distributed(cuda=False) as dist:
            done = dist.run(
                lambda: (
                    _write_scaled_adapter(adapter, adapter_dir, Path(out_dir), scale, step, overwrite, command)
                    if dist.is_main
                    else None
                )
            )
            done = dist.broadcast(done)
            assert done is not None  # rank 0's
            return done
    shard_limit = parse_size(options.max_shard_size, "--max-shard-size")
    with distributed(cuda=False) as dist, contextlib.ExitStack() as stack:
        base_ck = dist.run(lambda: _open_checked(adapter, adapter_dir, options, Path(out_dir), overwrite))
        out_dtype = DTYPES.get(dtype)
        names = list(base_ck.infos)  # file order, so shards read sequentially
        sizes = {n: out_bytes(base_ck.infos[n], out_dtype) for n in names}
        plan = plan_shards(names, sizes, limit=shard_limit)
        tmp = None
        if dist.is_main:
            tmp = stack.enter_context(
                atomic_output_dir(Path(out_dir), [base_ck.path, adapter_dir], overwrite=overwrite)
            )
        tmp = dist.broadcast(tmp)
        assert tmp is not None  # rank 0's folder
        files = shard_bytes(plan, sizes)
        mine = dist.share(list(files), files)
        deltas = delta_sources(adapter)  # tensor name -> callable giving the float32 drift
        dist.run(
            lambda: write_shards(
                base_ck, deltas, scale=scale, out_dtype=out_dtype, plan=plan, mine=mine, tmp=tmp, progress=progress
            )
        )
        if dist.is_main:
            dist.run(
                lambda: finish_model(
                    base_ck,
                    plan,
                    tmp=tmp,
                    dtype=dtype,
                    out_dtype=out_dtype,
                    adapter_ref=adapter_ref,
                    meta=meta,
                    scale=scale,
                    step=step,
                    command=command,
                )
            )
        else:
            dist.agree(None)
        changed = sum(1 for n in names if n in deltas)
        written = sum(sizes.values())
    return ApplyResult(Path(out_dir), scale, step, changed, len(names), len(files), written)


def _open_checked(
    adapter: Adapter, adapter_dir: Path, options: ApplyOptions, out_dir: Path, overwrite: bool
) -> Checkpoint:
    base_ck = open_base(adapter, options.base, allow_other_base=options.allow_other_base)
    check_output_dir(out_dir, [base_ck.path, adapter_dir], overwrite=overwrite)
    return base_ck


def _write_scaled_adapter(
    adapter: Adapter,
    adapter_dir: Path,
    out_dir: Path,
    scale: float,
    step: float,
    overwrite: bool,
    cmd: str | None,
) -> ApplyResult:
    """PEFT adapter with ``lora_alpha = scale · r`` per module and extras multiplied by ``scale``."""
    meta = adapter.meta.model_copy(update={"scale": scale, "scaled_from": str(adapter_dir.absolute()), "command": cmd})
    if any(abs(m.scaling - 1.0) > 1e-12 for m in adapter.modules.values()):
        raise InputError(f"{adapter_dir}: already a scaled adapter; scale the original adapter instead")
    config = peft_config(
        adapter.modules,
        adapter.config.get("base_model_name_or_path", ""),
        fan_in_fan_out=adapter.meta.fan_in_fan_out,
        task_type=adapter.config.get("task_type"),
        scale=scale,
    )
    extras = {k: scale_extra(v, scale) for k, v in adapter.extras.items()}
    with atomic_output_dir(out_dir, [adapter_dir], overwrite=overwrite) as tmp:
        write_adapter(
            tmp,
            adapter.modules,
            extras=extras,
            meta=meta,
            config=config,
            card=adapter_card(meta, meta.summary, where=out_dir.name),
        )
        written = sum(f.stat().st_size for f in tmp.iterdir())
    n = len(adapter.modules) + len(extras)
    return ApplyResult(out_dir, scale, step, n, n, 1, written)
