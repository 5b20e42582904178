"""Tiny models with a planted drift: the demo's embedded default and the tests' fixtures (no downloads).

Every floating-point parameter moves along a planted direction ``P`` (rank-1 ``u vᵀ`` for matrices) whose
per-element RMS is ``drift_rms`` (Adam-like updates move every element by a similar amount):
``W(s) = W0 + (s / s_last) · P + curvature · (s / s_last)² · Q + ε_s``, with ``Q`` another random direction of the
same size and ``ε_s`` fresh Gaussian noise per checkpoint with ``‖ε_s‖ = noise · ‖P‖``. Checkpoints are saved with
``save_pretrained`` as ``checkpoint-<step>`` folders, the layout TRL writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str = "llama", hidden: int = 32, layers: int = 2, vocab: int = 64):  # -> PretrainedConfig
    """A few-layer, few-dozen-unit config of a Llama, Qwen2 (attention biases) or GPT-2 (Conv1D, tied) model."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False,
        )  # fmt: skip
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=128,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


@dataclass
class SyntheticRun:
    base: Path
    checkpoints: list[Path]
    steps: list[int]
    directions: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> planted P


def make_run(
    folder: str | Path,
    arch: str = "llama",
    steps: Sequence[int] = (100, 200, 300),
    noise: float = 0.0,
    curvature: float = 0.0,
    drift_rms: float = 1e-3,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> SyntheticRun:
    """Write ``base/`` and ``checkpoint-<step>/`` folders under ``folder`` with a planted linear drift."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden, layers)).to(dtype)
    model.eval()
    base = folder / "base"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    params = dict(model.named_parameters())  # tied weights appear once
    w0 = {n: p.detach().float().clone() for n, p in params.items()}
    planted, curve = {}, {}
    for n, w in w0.items():
        size = drift_rms * w.numel() ** 0.5  # ‖P‖ for a per-element RMS of drift_rms
        planted[n] = direction(w, gen) * size
        curve[n] = direction(w, gen) * size
    paths = []
    for s in steps:
        x = s / steps[-1]
        with torch.no_grad():
            for n, p in params.items():
                eps = torch.randn(w0[n].shape, generator=gen) * (noise * drift_rms)  # ‖ε‖ ≈ noise · ‖P‖
                p.copy_((w0[n] + x * planted[n] + curvature * x * x * curve[n] + eps).to(dtype))
        path = folder / f"checkpoint-{s}"
        model.save_pretrained(path)
        paths.append(path)
    return SyntheticRun(base=base, checkpoints=paths, steps=list(steps), directions=planted)


def direction(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random unit-Frobenius direction shaped like ``w``: rank-1 ``u vᵀ`` for matrices, rank-1 ``u_e v_eᵀ`` per
    slice for 3-D ``(experts, a, b)`` stacks, dense for anything else."""
    if w.dim() == 2:
        u = torch.randn(w.shape[0], 1, generator=gen)
        v = torch.randn(1, w.shape[1], generator=gen)
        d = u @ v
    elif w.dim() == 3:
        u = torch.randn(w.shape[0], w.shape[1], 1, generator=gen)
        v = torch.randn(w.shape[0], 1, w.shape[2], generator=gen)
        d = u @ v
    else:
        d = torch.randn(w.shape, generator=gen)
    return d / torch.linalg.vector_norm(d)
