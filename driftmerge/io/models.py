"""Load causal LMs and tokenizers with transformers (local folders), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from driftmerge.errors import InputError, first_line


def load_causal_lm(folder: str | Path, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None) -> Any:
    """``AutoModelForCausalLM`` from ``folder`` in its stored dtype (or ``dtype``), on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury driftmerge's own
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    except Exception as exc:
        raise InputError(f"{folder}: transformers cannot load it as a causal LM ({first_line(exc)})") from exc
    return model.to(device).eval()


def load_tokenizer(folder: str | Path) -> Any:
    """``AutoTokenizer`` from ``folder``, padding on the left (for batched generation)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise InputError(f"{folder}: no usable tokenizer ({first_line(exc)}); copy the base's tokenizer files") from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids."""
    return a.get_vocab() == b.get_vocab()
