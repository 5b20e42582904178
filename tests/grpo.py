"""A tiny, offline TRL ``GRPOTrainer`` for tests: a two-layer Llama, a character tokenizer, a dozen prompts and a
cheap reward, on the CPU in about a second for a dozen steps (plus ~4 s to import TRL once per process).

    from grpo import make_grpo_trainer

    trainer = make_grpo_trainer(tmp_path / "out", max_steps=12, callbacks=[...], save_steps=6)
    trainer.train()                                # or .train(resume_from_checkpoint=True)

- the model: :func:`synthetic.tiny_config` ("llama", hidden 32, 2 layers, vocabulary 64), built after
  ``torch.manual_seed(seed)``, its special tokens the tokenizer's (no BOS; EOS and PAD from the tokenizer);
- the tokenizer: :func:`driftmerge.evaluation.addition.char_tokenizer` (built in-process, left padding);
- the data: :data:`PROMPTS`, plain-text prompts (no chat template), as a ``datasets.Dataset``;
- the reward: :func:`digit_reward`, the share of a completion's characters that are digits (around 0.2 for the
  untrained model, and it varies within a group, so GRPO's advantages are rarely all zero and the weights move);
  ``reward=`` replaces it (any TRL reward function, ``f(prompts, completions, **kwargs) -> list[float]``; TRL calls
  it once per generated batch, inside the ``training_step`` of the first optimizer step that batch trains);
- :class:`trl.GRPOConfig` for the CPU: float32 (``bf16=False``), ``use_cpu``, no activation checkpointing,
  ``num_generations`` = ``per_device_train_batch_size`` = :data:`GENERATIONS` (one prompt and its completions per
  optimizer step, generated fresh every step unless ``steps_per_generation`` says otherwise),
  :data:`COMPLETION_TOKENS`-token completions, learning rate 1e-2, ``logging_steps=1``, ``report_to=[]``,
  ``seed=data_seed=seed``, no saves unless ``save_steps`` is given (then ``save_strategy="steps"``);
  ``config_overrides`` replace any of these (``save_steps=6``, ``logging_steps=3``, ``steps_per_generation=2``, …);
- ``lora``: ``True`` for :func:`lora_config` (rank :data:`LORA_RANK` on every projection), or a ``peft.LoraConfig``;
  TRL wraps the model in a PEFT model, and only the LoRA factors (and any ``modules_to_save``) train.

:func:`one_thread` runs a block on one CPU thread: for a model this small, torch's intra-op threads only add
overhead, several times the run's time when other processes share the cores.

The trainer prints nothing (``disable_tqdm`` and its printer callback removed). It runs offline (nothing is
downloaded) and, for a given seed on the CPU, deterministically: a run stopped after a checkpoint and resumed with
``train(resume_from_checkpoint=...)`` reproduces the uninterrupted run's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from synthetic import tiny_config

PROMPTS = ["ab", "ba", "cab", "abc", "bca", "aa", "bb", "cc", "acb", "cba", "a", "b"]
COMPLETION_TOKENS = 8
GENERATIONS = 4  # completions per prompt, and the batch per device: one prompt per optimizer step
LORA_RANK = 2
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block, the previous count restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digit_reward(completions: Sequence[str], **kwargs: Any) -> list[float]:
    """The share of each completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def lora_config(rank: int = LORA_RANK, **kwargs: Any) -> Any:  # peft.LoraConfig
    """LoRA of rank ``rank`` (alpha 2·rank, no dropout) on every projection of the tiny Llama; ``kwargs`` (e.g.
    ``modules_to_save=["lm_head"]``) go to ``LoraConfig``."""
    from peft import LoraConfig

    settings = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS)}
    return LoraConfig(task_type="CAUSAL_LM", **{**settings, **kwargs})


def make_grpo_trainer(
    out_dir: str | Path,
    *,
    lora: Any = False,
    max_steps: int = 12,
    callbacks: Iterable[Any] = (),
    reward: Callable[..., list[float]] = digit_reward,
    seed: int = 0,
    **config_overrides: Any,
) -> Any:  # trl.GRPOTrainer
    """A ``GRPOTrainer`` on a fresh tiny Llama (seeded by ``seed``) writing to ``out_dir`` (module docstring)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from driftmerge.evaluation.addition import char_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = char_tokenizer()
    tok.padding_side = "left"
    config = tiny_config("llama")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    settings: dict[str, Any] = {
        "output_dir": str(out_dir),
        "max_steps": max_steps,
        "per_device_train_batch_size": GENERATIONS,
        "num_generations": GENERATIONS,
        "max_completion_length": COMPLETION_TOKENS,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "steps" if "save_steps" in config_overrides else "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
        **config_overrides,
    }
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=GRPOConfig(**settings),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=tok,
        peft_config=(lora_config() if lora is True else lora) or None,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's stand-in prints every log entry
    return trainer
