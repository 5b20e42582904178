"""Size of a driftmerge adapter for real MoE models (computed), checked against a real extract on tiny instances.

    python bench/moe_sizes.py [--ranks 1,4] [--json out.json]

Models: Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-20b, built from the shape fields of their published
``config.json`` (written below from memory: no network here) on the ``meta`` device — no memory, no weights.

Which keys a checkpoint holds: the meta model's ``state_dict()``, with tied duplicates dropped and transformers'
weight conversions reverted (``remove_tied_weights_from_state_dict`` + ``revert_weight_conversion``): the two
steps ``save_pretrained`` itself takes before writing, so the keys and shapes are the ones an RL run's checkpoints
hold (per-expert ``experts.N.w1/w2/w3`` for Mixtral, ``experts.N.gate_proj/up_proj/down_proj`` for Qwen3-MoE,
stacked ``experts.gate_up_proj`` ``(E, H, 2·I)`` plus biases for gpt-oss — in bf16, not the Hub's MXFP4 blocks).
The reverse conversions only reshape, so they run on meta tensors. The tiny cross-check asserts that this gives
exactly the keys and shapes a real ``save_pretrained`` writes.

Where each key goes comes from driftmerge's own mapping (``driftmerge.io.architecture.describe``); the bytes follow
the layout driftmerge writes (all float32, ``k = min(r, out, in)`` for a drift of full rank):

- LoRA module (Linear, router ``param``): ``A (k, in)`` + ``B (out, k)`` → ``4 k (in + out)``; embedding:
  ``4 k (vocab + dim)``;
- expert stack (E experts, one ``(out, in)`` matrix each, gathered from per-expert keys or sliced from a stored
  stack): ``A (E k, in)`` + ``B (out, k E)`` → ``4 E k (in + out)``, once per stacked parameter;
- extras (no PEFT target): full-rank ``4 · numel``, or factored ``4 k (m + n)`` on the ``(m, n) =
  (numel / shape[-1], shape[-1])`` view when ``driftmerge.io.assemble.factor_extra`` says so (large tensors of
  2+ dims that are not biases: gpt-oss's ``(E, 2·I)`` expert biases stay full-rank).

The base is ``2 · Σ numel`` (bf16). Cross-check: a tiny instance of each architecture (same config, small widths)
gets a base and two checkpoints with a drift planted in every loaded parameter (``save_pretrained`` writes its own
layout), ``driftmerge.commands.extract.extract`` runs at each rank, and the tensor bytes of
``adapter_model.safetensors`` + ``drift_extras.safetensors`` (file size minus the 8-byte length and the JSON header)
must equal the computed bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Shape fields of each model's config.json on the Hub (from memory; fields that change no tensor shape, such as
# rope settings, are left out except gpt-oss's layer_types, which must have num_hidden_layers entries).
REAL: dict[str, dict] = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,  # per expert
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,  # head_dim = 4096 / 32 = 128
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,  # dense MLP size, unused: every layer is sparse (decoder_sparse_step 1)
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "openai/gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,  # per expert
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "attention_bias": True,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "sliding_window": 128,
        "vocab_size": 201088,
        "tie_word_embeddings": False,
    },
}
# the tiny instances: the same configs at small widths (2 layers, 8 experts, vocab 1024); gpt-oss's (8, 2·1024)
# expert biases reach FACTOR_EXTRAS_MIN, so the factored-extras path is checked too
TINY: dict[str, dict] = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "vocab_size": 1024,
    },
    "Qwen/Qwen3-30B-A3B": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_experts": 8,
        "vocab_size": 1024,
    },
    "openai/gpt-oss-20b": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_local_experts": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "vocab_size": 1024,
    },
}
F32 = 4


@dataclass
class Sizes:
    """What one adapter holds, by the layout rules of the module docstring (bytes of tensor data)."""

    tensors: int = 0  # checkpoint keys fitted (tied duplicates left out)
    lora_modules: int = 0  # Linear / embedding targets
    param_targets: int = 0  # 2-D target_parameters (routers, …)
    expert_stacks: int = 0  # stacked expert target_parameters
    expert_matrices: int = 0  # one (out, in) matrix per expert of each stack: what gets factorized
    extras_full: int = 0  # extras tensors kept full-rank
    extras_factored: int = 0  # extras tensors kept as factors
    adapter_bytes: int = 0
    extras_bytes: int = 0

    @property
    def total(self) -> int:
        return self.adapter_bytes + self.extras_bytes

    @property
    def factorized(self) -> int:
        """Matrices the extract factorizes: modules, parameters, expert matrices, factored extras."""
        return self.lora_modules + self.param_targets + self.expert_matrices + self.extras_factored


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The keys and shapes ``save_pretrained`` writes for a ``config`` model, from a meta model (module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    sd = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, sd).items()}


def adapter_sizes(config: dict, shapes: dict[str, tuple[int, ...]], rank: int) -> Sizes:
    """Bytes of ``adapter_model.safetensors`` and ``drift_extras.safetensors`` data at integer ``rank``."""
    from driftmerge.io.architecture import describe
    from driftmerge.io.assemble import factor_extra

    arch = describe(config, shapes)
    out, stacks = Sizes(), set()
    for name, shape in shapes.items():
        if name in arch.tied:
            continue
        out.tensors += 1
        target = arch.targets.get(name)
        if target is None:
            if factor_extra(name, torch.empty(shape, device="meta")):
                m, n = math.prod(shape[:-1]), shape[-1]
                out.extras_factored += 1
                out.extras_bytes += F32 * min(rank, m, n) * (m + n)
            else:
                out.extras_full += 1
                out.extras_bytes += F32 * math.prod(shape)
        elif target.kind == "experts":
            if target.path in stacks:  # one PEFT target per stacked parameter, however many keys fill it
                continue
            stacks.add(target.path)
            assert target.dims is not None
            o, i = target.dims
            out.expert_stacks += 1
            out.expert_matrices += target.experts
            out.adapter_bytes += F32 * target.experts * min(rank, o, i) * (o + i)
        else:
            a, b = shape
            out.param_targets += target.kind == "param"
            out.lora_modules += target.kind != "param"
            out.adapter_bytes += F32 * min(rank, a, b) * (a + b)
    return out


def base_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return 2 * sum(math.prod(s) for s in shapes.values())


def tensor_bytes(path: Path) -> int:
    """Tensor data in a safetensors file: its size less the 8-byte header length and the JSON header."""
    with open(path, "rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
    return shapes


def planted_run(config: dict, root: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """A bf16 base and checkpoints at steps 100, 200: ``W0 + (k/2)·P + noise`` in every loaded parameter, ``P``
    rank-1 per matrix (per expert for a 3-D stack), RMS 1e-2 (large enough to survive bf16 rounding of norms at 1.0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    base = root / "base"
    model.save_pretrained(base)
    w0 = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    planted = {n: _direction(w.shape) for n, w in w0.items()}
    cks = []
    for k in (1, 2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                noise = torch.randn(p.shape) * 3e-3
                p.copy_((w0[n] + planted[n] * (k / 2) + noise).to(p.dtype))
        cks.append(root / f"checkpoint-{100 * k}")
        model.save_pretrained(cks[-1])
    return base, cks


def _direction(shape: torch.Size) -> torch.Tensor:
    """Rank-1 ``u vᵀ`` on the last two dims (one per leading index), dense for 1-D; RMS 1e-2."""
    if len(shape) == 1:
        return torch.randn(shape) * 1e-2
    u, v = torch.randn(*shape[:-1], 1), torch.randn(*shape[:-2], 1, shape[-1])
    return u * v * 1e-2


def cross_check(name: str, root: Path, ranks: list[int]) -> list[dict]:
    """Run the real extract on a tiny instance of ``name``; computed vs written tensor bytes at each rank."""
    from driftmerge.commands.extract import extract
    from driftmerge.commands.options import ExtractOptions
    from driftmerge.io.adapter import ADAPTER_WEIGHTS, EXTRAS

    config = {**REAL[name], **TINY[name]}
    base, cks = planted_run(config, root / name.replace("/", "--"))
    shapes = saved_shapes(base)
    predicted = checkpoint_shapes(config)
    if predicted != shapes:
        diff = sorted(set(predicted.items()) ^ set(shapes.items()))[:6]
        sys.exit(f"{name}: the meta route's keys differ from save_pretrained's: {diff}")
    rows = []
    for rank in ranks:
        out = root / f"{name.replace('/', '--')}-r{rank}"
        extract(base, cks, out_dir=out, options=ExtractOptions(rank=rank), overwrite=True)
        sizes = adapter_sizes(json.loads((base / "config.json").read_text()), shapes, rank)
        rows.append(
            {
                "model": name,
                "rank": rank,
                "keys": len(shapes),
                "computed_adapter": sizes.adapter_bytes,
                "written_adapter": tensor_bytes(out / ADAPTER_WEIGHTS),
                "computed_extras": sizes.extras_bytes,
                "written_extras": tensor_bytes(out / EXTRAS),
            }
        )
    return rows


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.1f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "driftmerge-bench" / "moe-sizes")
    ap.add_argument("--no-check", action="store_true", help="skip the tiny extract cross-check")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ranks = [int(r) for r in args.ranks.split(",")]
    t0 = time.perf_counter()
    real = []
    for name, config in REAL.items():
        shapes = checkpoint_shapes(config)
        for rank in ranks:
            s = adapter_sizes(config, shapes, rank)
            params = sum(math.prod(x) for x in shapes.values())
            facts = {"model": name, "rank": rank, "params": params, "base_bytes": base_bytes(shapes)}
            real.append({**facts, **asdict(s), "total_bytes": s.total})
    print(
        "| model | params | bf16 base | keys | LoRA modules / params / expert stacks | extras full / factored "
        "| rank | adapter | extras | total | % of base |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in real:
        print(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {mb(r['base_bytes'])} | {r['tensors']} | "
            f"{r['lora_modules']} / {r['param_targets']} / {r['expert_stacks']} | {r['extras_full']} / "
            f"{r['extras_factored']} | {r['rank']} | {mb(r['adapter_bytes'])} | {mb(r['extras_bytes'])} | "
            f"{mb(r['total_bytes'])} | {100 * r['total_bytes'] / r['base_bytes']:.3f} % |"
        )
    checks = []
    if not args.no_check:
        args.root.mkdir(parents=True, exist_ok=True)
        for name in REAL:
            checks += cross_check(name, args.root, ranks)
        print("\n| tiny instance of | keys | rank | adapter computed / written | extras computed / written | match |")
        print("|---|---|---|---|---|---|")
        for c in checks:
            ok = c["computed_adapter"] == c["written_adapter"] and c["computed_extras"] == c["written_extras"]
            print(
                f"| {c['model']} | {c['keys']} | {c['rank']} | {c['computed_adapter']:,} / {c['written_adapter']:,} "
                f"| {c['computed_extras']:,} / {c['written_extras']:,} | {'yes' if ok else 'NO'} |"
            )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"real": real, "cross_check": checks}, indent=2) + "\n")
    if any(
        c["computed_adapter"] != c["written_adapter"] or c["computed_extras"] != c["written_extras"] for c in checks
    ):
        sys.exit("the computed bytes differ from what extract wrote")


if __name__ == "__main__":
    main()
