"""The toy task the shipped demo run learned: multi-digit addition ``"a+b=" -> "c"`` with a 0/1 reward.

Shared by :mod:`driftmerge.commands.demo` (which scores the shipped run on held-out problems) and the toy GRPO
trainer of ``recipes/toy-rlvr/`` (which trained it). A character-level tokenizer, built in-process, serves both.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from driftmerge.evaluation.rewards import exact_number


def max_new_tokens(digits: int) -> int:
    """Tokens an answer needs: the sum's ``digits + 1`` digits and ``<eos>``."""
    return digits + 2


def problems(n: int, digits: int, *, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` prompts ``"a+b="`` with their answers, operands of 1..digits digits."""
    out = []
    for _ in range(n):
        a, b = (rng.randrange(10 ** rng.randint(1, digits)) for _ in range(2))
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def held_out(n: int, digits: int, *, seed: int) -> list[tuple[str, str]]:
    """The run's held-out problems: the same ``n`` for a seed, never drawn by training (its own generator)."""
    return problems(n, digits, rng=random.Random(10_000 + seed))


def reward(completion: str, answer: str) -> float:
    """1.0 when the completion's number is the sum (the built-in ``exact-number`` reward), else 0.0."""
    return exact_number("", completion, answer)


@torch.no_grad()
def sample(model: Any, tok: Any, *, prompts: list[str], n: int, greedy: bool, max_new_tokens: int) -> list[list[str]]:
    """``n`` completions per prompt (greedy, or temperature 1 sampling from the global generator)."""
    enc = tok([p for p in prompts for _ in range(n)], return_tensors="pt", padding=True, add_special_tokens=False)
    knobs = {"do_sample": not greedy, "temperature": None if greedy else 1.0, "top_p": None, "top_k": None}
    out = model.generate(
        **enc, **knobs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def accuracy(model: Any, tok: Any, *, pairs: list[tuple[str, str]], max_new_tokens: int) -> float:
    """Greedy accuracy on ``pairs``."""
    model.eval()
    got = sample(model, tok, prompts=[p for p, _ in pairs], n=1, greedy=True, max_new_tokens=max_new_tokens)
    return sum(reward(g[0], a) for g, (_, a) in zip(got, pairs, strict=True)) / len(pairs)


CHARS = "0123456789+-*/=.,:?!()[]{}\\ abcdefghijklmnopqrstuvwxyz\n"
SPECIALS = ("<pad>", "<eos>", "<unk>")


def char_tokenizer(folder: str | Path | None = None) -> Any:  # PreTrainedTokenizerFast
    """A character-level tokenizer built in-process (no downloads): ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``, then
    digits, arithmetic signs, brackets, space, lower-case letters and newline (62 in all: fits a vocabulary of 64).
    Saved to ``folder`` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # join characters without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if folder is not None:
        tok.save_pretrained(folder)
    return tok
