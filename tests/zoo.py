"""A zoo of tiny transformers models as transformers itself loads them, with a planted drift (no downloads).

Each :class:`ZooEntry` is a 2-layer config of one architecture, hidden 32 by default (4 heads / 2 KV heads, vocab
128, MLP 2·hidden; MoE models: 4 experts, top-2, expert MLP hidden/2; sizes given as :class:`W` scale with the width),
the Auto class that loads it, a tiny input and the PEFT ``task_type``
an adapter for it should carry. Gemma 3 is the text-only ``Gemma3TextConfig`` (what ``AutoModelForCausalLM`` builds:
``Gemma3ForCausalLM``); Qwen2-VL is the full ``Qwen2VLForConditionalGeneration`` with a depth-1 vision tower.

:func:`make_zoo_run` plants the drift in the *loaded* model's parameters and lets ``save_pretrained`` write its own
on-disk layout (per-expert keys for Mixtral and Qwen3-MoE, stacked experts for gpt-oss, ``embed_out`` for GPT-NeoX…):
``W(s) = W0 + (s / s_last) · P`` with ``P`` rank-1 ``u vᵀ`` for matrices, rank-1 ``u_e v_eᵀ`` per expert for 3-D
``(experts, a, b)`` stacks and dense otherwise, at a per-element RMS of ``drift_rms``. :func:`disk_map` says which
checkpoint key each element of each loaded parameter is saved under.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from helpers import load_weights
from synthetic import direction

VOCAB = 128
CAUSAL, VISION, MASKED, SEQ2SEQ = (
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
)
TASK_TYPES = {CAUSAL: "CAUSAL_LM", SEQ2SEQ: "SEQ_2_SEQ_LM", MASKED: None, VISION: None}  # what adapter_config holds


@dataclass(frozen=True)
class W:
    """A size given as a multiple of the model width: ``W(1 / 4)`` is ``hidden // 4``."""

    times: float

    def at(self, hidden: int) -> int:
        return max(1, int(self.times * hidden))


def _sized(value: Any, hidden: int) -> Any:
    """``value`` with every :class:`W` inside (dicts and lists too) resolved at width ``hidden``."""
    if isinstance(value, W):
        return value.at(hidden)
    if isinstance(value, dict):
        return {k: _sized(v, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [_sized(v, hidden) for v in value]
    return value


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config_class: str  # a transformers config class
    kwargs: dict[str, Any]  # its arguments; W(…) sizes scale with the width
    auto: str = CAUSAL  # the transformers Auto class that loads it

    def config(self, hidden: int = 32) -> Any:
        """The ``PretrainedConfig`` at width ``hidden`` (32 by default)."""
        import transformers

        return getattr(transformers, self.config_class)(**_sized(self.kwargs, hidden))

    @property
    def task_type(self) -> str | None:
        return TASK_TYPES[self.auto]

    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto)

    def inputs(self) -> dict[str, torch.Tensor]:
        """A tiny batch: 8 token ids (below every special id the configs set), plus decoder ids for T5."""
        ids = torch.tensor([[3, 17, 42, 5, 99, 7, 64, 11]])
        if self.auto == SEQ2SEQ:
            return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
        return {"input_ids": ids}


_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_SIZES = {"vocab_size": VOCAB, "hidden_size": W(1), "num_hidden_layers": 2, "num_attention_heads": 4}
_SIZES |= {"max_position_embeddings": 64}
_DECODER = {**_SIZES, "intermediate_size": W(2), "num_key_value_heads": 2, **_TOKENS}
_HEAD = {"head_dim": W(1 / 4)}
_SLIDING = {**_HEAD, "sliding_window": 16, "query_pre_attn_scalar": 8}
_EXPERTS = {"num_experts_per_tok": 2, "intermediate_size": W(1 / 2)}  # Mixtral, OLMoE, gpt-oss: experts only
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": W(1 / 2)}  # Qwen MoE, DeepSeek: experts + dense/shared
_MLA = {"q_lora_rank": W(1 / 2), "kv_lora_rank": W(1 / 2), "qk_rope_head_dim": W(1 / 4), "qk_nope_head_dim": W(1 / 4)}
_VL_TEXT = {**_DECODER, "rope_parameters": {"rope_type": "default", "mrope_section": [W(1 / 32), W(1 / 32), W(1 / 16)]}}
_VL_VISION = {"depth": 1, "embed_dim": W(1), "hidden_size": W(1), "num_heads": 4, "mlp_ratio": 2, "patch_size": 4}
_VL_TOKENS = {"image_token_id": 120, "video_token_id": 121, "vision_start_token_id": 122, "vision_end_token_id": 123}
_T5 = {"d_model": W(1), "d_kv": W(1 / 4), "d_ff": W(2), "num_layers": 2, "num_heads": 4}

_ENTRIES = [
    ZooEntry("llama", "LlamaConfig", _DECODER),
    ZooEntry("qwen2", "Qwen2Config", _DECODER),
    ZooEntry("qwen3", "Qwen3Config", {**_DECODER, **_HEAD}),
    ZooEntry("mistral", "MistralConfig", {**_DECODER, **_HEAD, "sliding_window": 16}),
    ZooEntry("gemma", "GemmaConfig", {**_DECODER, **_HEAD}),
    ZooEntry("gemma2", "Gemma2Config", {**_DECODER, **_SLIDING}),
    ZooEntry("gemma3", "Gemma3TextConfig", {**_DECODER, **_SLIDING}),  # AutoModelForCausalLM: Gemma3ForCausalLM
    ZooEntry("phi3", "Phi3Config", _DECODER),
    ZooEntry(
        "gpt2",
        "GPT2Config",
        {"vocab_size": VOCAB, "n_embd": W(1), "n_layer": 2, "n_head": 4, "n_positions": 64, **_TOKENS},
    ),
    ZooEntry("gpt_neox", "GPTNeoXConfig", {**_DECODER, "num_key_value_heads": None}),
    ZooEntry("opt", "OPTConfig", {**_SIZES, **_TOKENS, "ffn_dim": W(2), "word_embed_proj_dim": W(1)}),
    ZooEntry("falcon", "FalconConfig", {**_SIZES, **_TOKENS, "ffn_hidden_size": W(2)}),
    ZooEntry("olmo2", "Olmo2Config", _DECODER),
    ZooEntry("granite", "GraniteConfig", _DECODER),
    ZooEntry("starcoder2", "Starcoder2Config", _DECODER),
    ZooEntry("stablelm", "StableLmConfig", _DECODER),
    ZooEntry("cohere", "CohereConfig", _DECODER),
    ZooEntry("mixtral", "MixtralConfig", {**_DECODER, **_EXPERTS, "num_local_experts": 4}),
    ZooEntry(
        "qwen2_moe", "Qwen2MoeConfig", {**_DECODER, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": W(1)}
    ),
    ZooEntry("qwen3_moe", "Qwen3MoeConfig", {**_DECODER, **_MOE, **_HEAD, "num_experts": 4}),
    ZooEntry("olmoe", "OlmoeConfig", {**_DECODER, **_EXPERTS, "num_experts": 4}),
    ZooEntry(
        "deepseek_v3",  # layer 0 dense (first_k_dense_replace), layer 1 routed + one shared expert
        "DeepseekV3Config",
        {**_DECODER, **_MOE, **_MLA, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1}
        | {"n_group": 1, "topk_group": 1, "num_key_value_heads": 4, "v_head_dim": W(1 / 4)},
    ),
    ZooEntry(
        "gpt_oss",
        "GptOssConfig",
        {**_DECODER, **_EXPERTS, **_HEAD, "num_local_experts": 4, "sliding_window": 16}
        | {"layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {"rope_type": "default"}},
    ),
    ZooEntry(
        "qwen2_vl",
        "Qwen2VLConfig",
        {"text_config": _VL_TEXT, "vision_config": _VL_VISION, **_VL_TOKENS, "tie_word_embeddings": False},
        auto=VISION,
    ),
    ZooEntry("bert", "BertConfig", {**_SIZES, "intermediate_size": W(2), "pad_token_id": 0}, auto=MASKED),
    ZooEntry(
        "t5",
        "T5Config",
        {"vocab_size": VOCAB, **_T5, "relative_attention_num_buckets": 8, "pad_token_id": 0, "eos_token_id": 1}
        | {"decoder_start_token_id": 0},
        auto=SEQ2SEQ,
    ),
]
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


@dataclass
class ZooRun:
    entry: ZooEntry
    base: Path
    checkpoints: list[Path]
    steps: list[int]
    directions: dict[str, torch.Tensor] = field(default_factory=dict)  # loaded parameter name -> planted P


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, hidden: int = 32) -> Any:
    """A fresh, randomly initialised model of entry ``name`` at width ``hidden`` from its Auto class, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    entry = ZOO[name]
    torch.manual_seed(seed)
    return entry.auto_class().from_config(entry.config(hidden), dtype=dtype).eval()


def load(name: str, folder: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """``folder`` loaded the way transformers loads entry ``name`` (its Auto class), in eval mode."""
    return ZOO[name].auto_class().from_pretrained(folder, dtype=dtype).eval()


def make_zoo_run(
    folder: str | Path,
    name: str,
    steps: Sequence[int] = (100, 200, 300),
    dtype: torch.dtype = torch.float32,
    drift_rms: float = 1e-3,
    seed: int = 0,
    hidden: int = 32,
) -> ZooRun:
    """Write ``base/`` and ``checkpoint-<step>/`` under ``folder``: ``W(s) = W0 + (s / s_last) · P`` on every loaded
    parameter (tied ones once), ``‖P‖ = drift_rms · √numel``, saved by ``save_pretrained``."""
    folder = Path(folder)
    model = build(name, dtype, seed, hidden)
    base = folder / "base"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    params = dict(model.named_parameters())  # tied weights appear once
    w0 = {n: p.detach().float().clone() for n, p in params.items()}
    planted = {n: direction(w, gen) * (drift_rms * w.numel() ** 0.5) for n, w in w0.items()}
    paths = []
    for s in steps:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_((w0[n] + (s / steps[-1]) * planted[n]).to(dtype))
        path = folder / f"checkpoint-{s}"
        model.save_pretrained(path)
        paths.append(path)
    return ZooRun(entry=ZOO[name], base=base, checkpoints=paths, steps=list(steps), directions=planted)


@dataclass
class DiskMap:
    """Where each element of each loaded parameter lives on disk: ``keys[index[name][i]]`` is the checkpoint key
    element ``i`` of parameter ``name`` is saved under (-1: not saved)."""

    keys: list[str]
    index: dict[str, torch.Tensor]  # loaded parameter name -> int64 tensor of its shape

    def keys_of(self, name: str) -> set[str]:
        return {self.keys[i] for i in self.index[name].unique().tolist() if i >= 0}

    def mask(self, name: str, keys: set[str]) -> torch.Tensor:
        """The elements of parameter ``name`` saved under one of ``keys``."""
        ids = torch.tensor([i for i, k in enumerate(self.keys) if k in keys], dtype=torch.int64)
        return torch.isin(self.index[name], ids)


def disk_map(name: str) -> DiskMap:
    """Label every element of a float32 model with its own integer ``1…N`` (exact below 2²⁴), ``save_pretrained`` it
    and read back which key holds each label: transformers' renaming, fusing and splitting tables, seen from outside.
    Saved buffers (constants, random floats) are not sets of distinct labels and are left out."""
    model = build(name, torch.float32)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    if total >= 2**24:
        raise ValueError(f"{name}: {total} parameters is too many to label exactly in float32")
    offsets, start = {}, 0
    with torch.no_grad():
        for n, p in params.items():
            offsets[n] = start
            p.copy_(torch.arange(start + 1, start + 1 + p.numel(), dtype=torch.float64).view(p.shape))
            start += p.numel()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_weights(Path(tmp))
    owner = torch.full((total,), -1, dtype=torch.int64)
    keys = sorted(saved)
    for i, k in enumerate(keys):
        labels = saved[k].double().flatten()
        if not saved[k].is_floating_point() or not bool(((labels >= 1) & (labels <= total)).all()):
            continue
        if not torch.equal(labels, labels.round()) or labels.unique().numel() != labels.numel():
            continue
        owner[labels.long() - 1] = i
    index = {n: owner[offsets[n] : offsets[n] + p.numel()].view(p.shape) for n, p in params.items()}
    return DiskMap(keys=keys, index=index)
