"""Teacher-forced log-prob linearity: how linearly each response token's log-probability moves with the step.

Every model (the base, then each checkpoint) scores fixed (prompt, response) pairs: the log-probability of each
response token given the prompt and the response before it. Per token, the values at the base and checkpoints are
regressed on the step (Pearson r², points = base + checkpoints); tokens whose log-prob moved by more than
``min_move`` over the trajectory are kept (the seed paper's rule, 0.2 by default).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from driftmerge.core.linearity import R2_THRESHOLD
from driftmerge.errors import InputError


def response_logprobs(
    model_dir: Path, pairs: list[dict[str, str]], *, tokenizer: Any, device: torch.device, batch_size: int = 8
) -> torch.Tensor:
    """Log-probs of all response tokens of all pairs, concatenated in order: ``(tokens,)`` float64."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury driftmerge's own
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        seqs, spans = [], []
        for p in batch:
            prompt = tokenizer(p["prompt"], add_special_tokens=True)["input_ids"]
            resp = tokenizer(p["response"], add_special_tokens=False)["input_ids"]
            if not prompt or not resp:
                raise InputError("--logprobs: every pair needs a prompt and a response that tokenize to something")
            seqs.append(prompt + resp)
            spans.append((len(prompt), len(resp)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, L) right-padded
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, L, V)
        logp = torch.log_softmax(logits, dim=-1)
        for i, (p_len, r_len) in enumerate(spans):
            pos = torch.arange(p_len - 1, p_len + r_len - 1, device=device)  # the logit that predicts each token
            tok = ids[i, p_len : p_len + r_len].to(device)
            out.append(logp[i, pos, tok].double().cpu())
    del model
    return torch.cat(out)


def logprob_linearity(
    base: Path, checkpoints: list[Path], *, pairs: list[dict[str, str]], t: list[int], opts: Any, device: torch.device
) -> dict[str, Any]:
    """Score every pair with every model and summarize the per-token R² against the step."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as exc:
        raise InputError(f"{base}: no usable tokenizer for --logprobs ({str(exc).splitlines()[0]})") from exc
    values = torch.stack(
        [
            response_logprobs(p, pairs, tokenizer=tokenizer, device=device, batch_size=opts.batch_size)
            for p in (base, *checkpoints)
        ]
    )  # (n points, tokens)
    ts = torch.tensor([0.0, *map(float, t)], dtype=torch.float64)[:, None]  # (n, 1)
    spread = values.amax(0) - values.amin(0)
    kept = spread > opts.logprob_min_move
    r2: list[float] = []
    if len(t) >= 2 and bool(kept.any()):
        y = values[:, kept]
        yc, tc = y - y.mean(0), ts - ts.mean()
        s_ty = (tc * yc).sum(0)
        r2 = ((s_ty * s_ty) / (float((tc * tc).sum()) * (yc * yc).sum(0).clamp_min(1e-300))).clamp(0, 1).tolist()
    return {
        "pairs": len(pairs),
        "tokens": int(values.shape[1]),
        "min_move": opts.logprob_min_move,
        "kept": int(kept.sum()),
        "r2_median": statistics.median(r2) if r2 else None,
        "r2_share_above": sum(x > R2_THRESHOLD for x in r2) / len(r2) if r2 else None,
        "r2_values": r2,
        "mean_logprob": values.mean(1).tolist(),  # per point: base, then checkpoints
    }
