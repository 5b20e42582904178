"""A toy RLVR run on a laptop: a tiny causal LM learns multi-digit addition, then GRPO with a 0/1 reward.

Stages (all seeded, CPU, no downloads):

1. build a tiny Llama-shaped model and a character tokenizer (:func:`driftmerge.evaluation.addition.char_tokenizer`);
2. supervised training on ``"a+b=" -> "c<eos>"`` until greedy accuracy on a held-out set reaches
   ``sft_target`` (partial accuracy: the room RL needs), saved as ``base/`` (step 0);
3. ``rl``: GRPO — per step, ``group`` completions for each of ``batch`` prompts sampled at temperature 1, reward
   1 if the completion's number is the sum else 0, advantage ``A = (r - mean_group) / (std_group + 1e-4)``, loss
   ``-Σ_i A_i Σ_t log π(y_it) / (batch · group · max_new_tokens)`` (Dr. GRPO's constant normalizer, one update per
   batch so the PPO ratio is 1), plus ``kl_coef · Σ_i Σ_t k3_it / (batch · group · max_new_tokens)`` against the
   supervised start (GRPO's estimator, as TRL's ``beta``: ``k3 = exp(r) - r - 1`` with ``r = log π_ref - log π``;
   ``kl_coef`` 0, the default, leaves it out), Adam; or ``sft``: the control — continued supervised training on the
   same prompts with the correct answers;
4. a Hugging Face checkpoint ``checkpoint-<step>/`` every ``save_every`` steps, and ``run.json`` with the reward
   per step and the held-out accuracy per checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from driftmerge.evaluation.addition import accuracy, char_tokenizer, max_new_tokens, problems, reward, sample
from driftmerge.evaluation.addition import held_out as held_out_problems


@dataclass(frozen=True)
class ToyConfig:
    digits: int = 3  # operands have 1..digits digits
    hidden: int = 64
    layers: int = 2
    sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_max_steps: int = 3000
    sft_target: float = 0.35  # stop supervised training at this held-out greedy accuracy
    rl_lr: float = 3e-4
    rl_steps: int = 200
    kl_coef: float = 0.0  # GRPO's KL penalty against the supervised start (TRL's beta); 0: none
    batch: int = 32  # prompts per RL step
    group: int = 8  # completions per prompt
    save_every: int = 25
    eval_size: int = 256
    seed: int = 0

    @property
    def max_new_tokens(self) -> int:
        return max_new_tokens(self.digits)


# CI and the demo (about 40 s on 2 cores), and the default (a few minutes)
SMALL = ToyConfig(digits=2, sft_target=0.3, rl_lr=5e-4, batch=64, rl_steps=200, save_every=25)
DEFAULT = ToyConfig(digits=2, hidden=96, sft_target=0.3, rl_lr=5e-4, batch=64, rl_steps=600, save_every=50)


# ---- model -----------------------------------------------------------------------------------------------------------
def build(cfg: ToyConfig) -> tuple[Any, Any]:
    """A fresh tiny Llama and the character tokenizer, seeded."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" per checkpoint
    torch.manual_seed(cfg.seed)
    tok = char_tokenizer()
    tok.padding_side = "left"
    config = LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config), tok


def save(model: Any, tok: Any, folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _teacher_batch(tok: Any, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` with labels only on the answer and <eos> (-100 elsewhere)."""
    seqs, labels = [], []
    for p, a in pairs:
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, la) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)], lab[i, : len(la)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(la), 1
    return ids, mask, lab


def sft_step(model: Any, tok: Any, opt: torch.optim.Optimizer, pairs: list[tuple[str, str]]) -> float:
    """One supervised step (cross-entropy on the answer tokens)."""
    ids, mask, lab = _teacher_batch(tok, pairs)
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def grpo_step(
    model: Any, tok: Any, opt: torch.optim.Optimizer, pairs: list[tuple[str, str]], cfg: ToyConfig, ref: Any = None
) -> tuple[float, float]:
    """One GRPO update; returns the batch's mean reward and the mean per-token KL estimate against ``ref`` (the
    frozen supervised start, used when ``cfg.kl_coef`` > 0; else 0.0)."""
    model.eval()
    prompts = [p for p, _ in pairs]
    comps = sample(model, tok, prompts=prompts, n=cfg.group, greedy=False, max_new_tokens=cfg.max_new_tokens)
    rewards = torch.tensor([[reward(c, a) for c in cs] for cs, (_, a) in zip(comps, pairs, strict=True)])  # (B, G)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)  # (B, G)
    model.train()
    ids, mask, lab = _teacher_batch(tok, [(p, c) for p, cs in zip(prompts, comps, strict=True) for c in cs])
    target = lab[:, 1:]
    answer = target != -100  # (B·G, L-1) the completion's tokens
    logp = _token_logp(model, ids, mask, target)  # (B·G, L-1)
    norm = len(pairs) * cfg.group * cfg.max_new_tokens
    loss = -(adv.flatten() * (logp * answer).sum(1)).sum() / norm
    kl = 0.0
    if cfg.kl_coef > 0 and ref is not None:
        with torch.no_grad():
            ref_logp = _token_logp(ref, ids, mask, target)  # (B·G, L-1)
        r = ref_logp - logp
        k3 = (torch.exp(r) - r - 1) * answer  # (B·G, L-1) ≥ 0, zero (with zero gradient) where π = π_ref
        loss = loss + cfg.kl_coef * k3.sum() / norm
        kl = float(k3.detach().sum() / answer.sum().clamp_min(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(rewards.mean()), kl


def _token_logp(model: Any, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log π(target_t | ids_<t)`` per position ``(N, L-1)`` (0 where ``target`` is -100)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (N, L-1, V)
    return torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]


# ---- the run ---------------------------------------------------------------------------------------------------------
def supervised_start(cfg: ToyConfig, log: Callable[[str], None] = print) -> tuple[Any, Any, dict[str, Any]]:
    """Build the model and train it on the task up to ``cfg.sft_target`` held-out accuracy."""
    model, tok = build(cfg)
    rng = random.Random(cfg.seed)
    held_out = held_out_problems(cfg.eval_size, cfg.digits, seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    acc, step = 0.0, 0
    for step in range(1, cfg.sft_max_steps + 1):
        model.train()
        sft_step(model, tok, opt, problems(cfg.sft_batch, cfg.digits, rng=rng))
        if step % 25 == 0:
            acc = accuracy(model, tok, pairs=held_out, max_new_tokens=cfg.max_new_tokens)
            if acc >= cfg.sft_target:
                break
    log(f"supervised start: {step} steps, held-out greedy accuracy {acc:.3f}")
    return model, tok, {"sft_steps": step, "sft_accuracy": acc, "held_out": held_out}


def run(
    out: str | Path,
    cfg: ToyConfig = DEFAULT,
    mode: str = "rl",
    log: Callable[[str], None] = print,
    start: tuple[Any, Any, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole recipe into ``out``: ``base/``, ``checkpoint-<step>/`` and ``run.json``. ``mode``: rl | sft."""
    if mode not in ("rl", "sft"):
        raise ValueError(f"mode must be rl or sft, got {mode!r}")
    out = Path(out)
    t0 = time.perf_counter()
    model, tok, info = start or supervised_start(cfg, log)
    save(model, tok, out / "base")
    held_out = info["held_out"]
    rng = random.Random(1_000 + cfg.seed)
    torch.manual_seed(2_000 + cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.rl_lr)
    ref = _frozen(model) if mode == "rl" and cfg.kl_coef > 0 else None
    train_reward, train_kl, evals = [], [], [{"step": 0, "accuracy": info["sft_accuracy"]}]
    for step in range(1, cfg.rl_steps + 1):
        pairs = problems(cfg.batch, cfg.digits, rng=rng)
        if mode == "rl":
            r, kl = grpo_step(model, tok, opt, pairs, cfg, ref)
            train_reward.append(r)
            train_kl.append(kl)
        else:
            model.train()
            sft_step(model, tok, opt, pairs)
        if step % cfg.save_every == 0:
            save(model, tok, out / f"checkpoint-{step}")
            evals.append(
                {"step": step, "accuracy": accuracy(model, tok, pairs=held_out, max_new_tokens=cfg.max_new_tokens)}
            )
            log(f"{mode} step {step}: held-out accuracy {evals[-1]['accuracy']:.3f}")
    record = {
        "config": asdict(cfg),
        "mode": mode,
        "sft_steps": info["sft_steps"],
        "train_reward": train_reward,
        "train_kl": train_kl,
        "evals": evals,
        "seconds": time.perf_counter() - t0,
    }
    (out / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _frozen(model: Any) -> Any:
    """A copy of ``model`` that takes no gradients: GRPO's reference policy."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def write_prompts(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """``pairs`` as the JSON lines ``sweep --prompts`` reads: ``{"prompt": ..., "answer": ...}`` each."""
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return path


def config_for(small: bool, seed: int, **overrides: Any) -> ToyConfig:
    return replace(SMALL if small else DEFAULT, seed=seed, **overrides)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ---- re-grounding (the seed paper's periodic extrapolation) ------------------------------------------------------
def steps_to_threshold(
    start: tuple[Any, Any, dict[str, Any]],
    cfg: ToyConfig,
    threshold: float,
    max_steps: int,
    check_every: int = 10,
    reground: tuple[int, int] | None = None,
    snapshots: int = 5,
    rank: int | None = None,
    optimizer: str = "keep",
) -> dict[str, Any]:
    """GRPO steps until held-out greedy accuracy reaches ``threshold`` (checked every ``check_every`` steps).

    ``reground=(M, N)``: :class:`driftmerge.core.reground.Regrounder` (the engine of the Trainer callback) every M steps
    fits the line through the window's start and ``snapshots`` evenly spaced snapshots (``rank``: None = full) and
    jumps N steps ahead; ``optimizer``: keep or reset Adam's moments. Jumps cost no RL steps. Returns the steps
    needed (None when not reached), the jumps and the accuracy curve.
    """
    import copy

    from driftmerge.core.reground import Regrounder, reset_moments

    model, tok, info = copy.deepcopy(start[0]), start[1], start[2]
    rng = random.Random(1_000 + cfg.seed)
    torch.manual_seed(2_000 + cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.rl_lr)
    ref = _frozen(model) if cfg.kl_coef > 0 else None
    params = dict(model.named_parameters())
    regrounder = None
    if reground:
        regrounder = Regrounder(params, every=reground[0], jump=reground[1], window=snapshots, rank=rank)
        regrounder.start(0)
    curve: list[tuple[int, float]] = []
    for step in range(1, max_steps + 1):
        grpo_step(model, tok, opt, problems(cfg.batch, cfg.digits, rng=rng), cfg, ref)
        if regrounder is not None and regrounder.step(step) is not None and optimizer == "reset":
            reset_moments(opt, list(params.values()))
        if step % check_every == 0:
            curve.append((step, accuracy(model, tok, pairs=info["held_out"], max_new_tokens=cfg.max_new_tokens)))
            if curve[-1][1] >= threshold:
                break
    reached = curve[-1][0] if curve and curve[-1][1] >= threshold else None
    return {"steps": reached, "jumps": len(regrounder.jumps) if regrounder else 0, "curve": curve}
