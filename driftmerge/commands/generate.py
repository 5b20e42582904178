"""``generate``: completions by logit extrapolation between two models (see :mod:`driftmerge.evaluation.generation`)."""

from __future__ import annotations

import json
import math
import statistics
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError
from driftmerge.io.outputs import atomic_output_file


def extrapolated_completions(
    early: str,
    late: str,
    *,
    alpha: float,
    prompts: str | Path,
    sampling: dict[str, Any],
    reward: str | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Sample from ``z = z_early + alpha (z_late - z_early)``; rows of (prompt, sample, completion[, reward]) and a
    one-line summary. Written to ``out`` as JSON lines when given, atomically: a folder that cannot be written fails
    before any model is loaded, and an interrupted or failed run leaves no file."""
    from driftmerge.core.devices import resolve_device
    from driftmerge.evaluation.generation import SamplingOptions, generate, read_prompts
    from driftmerge.evaluation.rewards import BUILT_IN, load_reward
    from driftmerge.hub.refs import resolve
    from driftmerge.io.models import load_causal_lm, load_tokenizer, same_vocabulary

    if not math.isfinite(alpha):
        raise InputError(f"--alpha must be a finite number, got {alpha}")
    opts = SamplingOptions(**sampling)
    opts.validate()
    with ExitStack() as stack:
        writer = atomic_output_file(out, overwrite=overwrite, what="the completions") if out is not None else None
        tmp = stack.enter_context(writer) if writer is not None else None  # fails here on a read-only folder
        score = load_reward(reward) if reward is not None else None
        records = read_prompts(prompts, need_answer=reward in BUILT_IN)
        dev = resolve_device(device)
        early_path, late_path = resolve(early).path, resolve(late).path
        tok_a, tok_b = load_tokenizer(early_path), load_tokenizer(late_path)
        if not same_vocabulary(tok_a, tok_b):
            raise InputError(f"{early} and {late} have different tokenizers; logit extrapolation needs one vocabulary")
        model_a, model_b = load_causal_lm(early_path, dev), load_causal_lm(late_path, dev)
        prompt_texts = [r["prompt"] for r in records]
        texts = generate(model_b, tok_b, prompts=prompt_texts, opts=opts, early=model_a, alpha=alpha)
        rows = []
        for p, (rec, ts) in enumerate(zip(records, texts, strict=True)):
            for k, t in enumerate(ts):
                row: dict[str, Any] = {"prompt": p, "sample": k, "completion": t}
                if score is not None:
                    row["reward"] = float(score(rec["prompt"], t, rec.get("answer")))
                rows.append(row)
        if tmp is not None:  # renamed over ``out`` as the block ends
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = ""
    if score is not None:
        rewards = [r["reward"] for r in rows]
        summary = f"alpha {alpha:g}: mean reward {statistics.fmean(rewards):.4f} over {len(rewards)} completions"
    return rows, summary
