"""Sampling completions with transformers' ``generate``, and output-space (logit) extrapolation.

Logit extrapolation (docs/design.md §2.6, the seed paper's second method): an early model A and a late model B run in
lockstep over the same tokens, each with its own KV cache; every next-token distribution comes from

    z = z_A + alpha · (z_B - z_A)

(``alpha`` 1 gives B, 0 gives A, 1.5 goes half as far again beyond B), then temperature / top-p sampling.
:class:`LogitExtrapolation` is a transformers ``LogitsProcessor``: pass it to ``B.generate(...,
logits_processor=[LogitExtrapolation(A, alpha, attention_mask)])``; transformers applies custom processors before
its temperature and top-p warpers, so sampling sees the extrapolated logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from driftmerge.errors import InputError
from driftmerge.io.jsonl import read_records


@dataclass
class SamplingOptions:
    samples: int = 1  # completions per prompt
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0
    seed: int = 0  # every call with the same seed draws the same random numbers
    batch_size: int = 16  # sequences per generate call
    chat: bool = False  # wrap each prompt in the tokenizer's chat template

    def validate(self) -> None:
        if self.samples < 1:
            raise InputError(f"--samples must be at least 1, got {self.samples}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")


def read_prompts(path: str | Path, need_answer: bool = False) -> list[dict[str, Any]]:
    """JSON lines, one ``{"prompt": ..., "answer": ...}`` record each (``answer`` needed by the built-in rewards)."""
    records = read_records(path, ("prompt",), what="prompts")
    for n, rec in records:
        if need_answer and "answer" not in rec:
            raise InputError(f'{path}:{n}: no "answer" to score against (the reward compares with it)')
    return [rec for _, rec in records]


class LogitExtrapolation:
    """A ``LogitsProcessor``: ``z = z_A + alpha (z_B - z_A)`` with A (``early``) run here, B by ``generate``.

    ``attention_mask``: the prompts' mask, exactly as given to ``generate`` (left padding; with
    ``num_return_sequences`` > 1, repeat the prompts yourself instead). Use one instance per ``generate`` call.
    """

    def __init__(self, early: Any, alpha: float, attention_mask: torch.Tensor):
        self.early, self.alpha = early, float(alpha)
        self.prompt_mask = attention_mask
        self.cache_kwarg = cache_keyword(early)
        self.cache: Any = new_cache(early)  # A's own KV cache, grown in place by every forward
        self.fed = 0  # tokens A has seen

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        batch, length = input_ids.shape
        grown = length - self.prompt_mask.shape[1]
        ones = self.prompt_mask.new_ones((batch, grown))
        mask = torch.cat([self.prompt_mask.to(input_ids.device), ones.to(input_ids.device)], dim=1)  # (B, L)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate computes them for left padding
        out = self.early(
            input_ids=input_ids[:, self.fed :],
            attention_mask=mask,
            position_ids=positions[:, self.fed :],
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = out.get(self.cache_kwarg, self.cache)  # the same object, unless the model made a new one
        self.fed = length
        z_a = out.logits[:, -1, :].float()  # (B, V)
        if z_a.shape[-1] != scores.shape[-1]:
            raise InputError(f"the two models' vocabularies differ ({z_a.shape[-1]} and {scores.shape[-1]} logits)")
        return torch.lerp(z_a, scores.float(), self.alpha)  # exact at alpha 0 (z_A) and 1 (z_B)


def cache_keyword(model: Any) -> str:
    """The name ``model.forward`` takes its KV cache under: ``cache`` from transformers 5.x on (where
    ``past_key_values`` is deprecated and warns), ``past_key_values`` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters  # follows the deprecation wrapper to the real signature
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty ``transformers.DynamicCache`` for ``model`` (its layer types from the config where supported)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # a transformers whose DynamicCache takes no config
        return DynamicCache()


def generate(
    model: Any,
    tokenizer: Any,
    *,
    prompts: list[str],
    opts: SamplingOptions,
    early: Any = None,
    alpha: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """``opts.samples`` completions per prompt from ``model`` (or extrapolated from ``early`` to ``model``)."""
    from transformers import GenerationConfig

    texts = [_render(tokenizer, p, opts.chat) for p in prompts]
    rows = [(i, t) for i, t in enumerate(texts) for _ in range(opts.samples)]
    config = GenerationConfig(
        max_new_tokens=opts.max_new_tokens,
        do_sample=opts.temperature > 0,
        temperature=opts.temperature if opts.temperature > 0 else None,
        top_p=opts.top_p if opts.temperature > 0 else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_eos_ids(model, tokenizer),
    )
    device = next(model.parameters()).device
    out: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(opts.seed)  # generate samples from the global generator: same seed, same draws
    for start in range(0, len(rows), opts.batch_size):
        chunk = rows[start : start + opts.batch_size]
        enc = tokenizer([t for _, t in chunk], return_tensors="pt", padding=True, add_special_tokens=not opts.chat)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (b, L) left-padded
        procs = [LogitExtrapolation(early, alpha, mask)] if early is not None else []
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=procs)
        for (i, _), seq in zip(chunk, gen[:, ids.shape[1] :], strict=True):
            out[i].append(tokenizer.decode(seq, skip_special_tokens=True))
        if progress:
            progress(min(start + opts.batch_size, len(rows)), len(rows))
    return out


def _render(tokenizer: Any, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat: the tokenizer has no chat template; leave --chat out to send prompts as they are")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _eos_ids(model: Any, tokenizer: Any) -> Any:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id
