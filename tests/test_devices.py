"""CUDA factorization agrees with the CPU (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.core.devices import resolve_device
from driftmerge.errors import InputError
from driftmerge.io.adapter import read_adapter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_device_and_missing_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu-ish")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu(runs, tmp_path, factor_dtype):
    run = runs["llama"]
    cpu = extract(run.base, run.checkpoints, out_dir=tmp_path / "cpu", options=ExtractOptions(device="cpu"))
    gpu = extract(
        run.base,
        run.checkpoints,
        out_dir=tmp_path / "gpu",
        options=ExtractOptions(device="cuda", factor_dtype=factor_dtype),
    )
    a, b = read_adapter(tmp_path / "cpu"), read_adapter(tmp_path / "gpu")
    for path, mod in a.modules.items():
        d_cpu, d_gpu = mod.delta(), b.modules[path].delta()
        cos = torch.dot(d_cpu.flatten(), d_gpu.flatten()) / (d_cpu.norm() * d_gpu.norm())
        assert cos > 0.999, path
    for name, rec in cpu.meta.tensors.items():
        if rec.stored == "lora":
            assert abs(rec.energy - gpu.meta.tensors[name].energy) < 1e-3
