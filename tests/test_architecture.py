"""The transformers-free path for dense decoders gives what the meta-device skeleton gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from driftmerge.io.architecture import DENSE_DECODERS, describe
from driftmerge.io.skeleton import from_skeleton

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
    pad_token_id=0,
)


@pytest.mark.parametrize("model_type", sorted(DENSE_DECODERS))
@pytest.mark.parametrize("tie", [True, False, None])
def test_dense_decoder_names_match_the_skeleton(model_type, tie):
    config = {"model_type": model_type, **TINY}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    cfg = AutoConfig.for_model(**config)
    assert cfg.tie_word_embeddings == (DENSE_DECODERS[model_type] if tie is None else tie)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # what save_pretrained writes when untied; tied checkpoints may or may not store lm_head, so list it anyway
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    fast, slow = describe(config, shapes), from_skeleton(config, shapes, folder=None, trust_remote_code=False)
    assert fast.source == "known"
    assert fast.kinds == slow.kinds
    assert fast.modules == slow.modules
    assert fast.tied == slow.tied
    assert fast.fan_in_fan_out is slow.fan_in_fan_out is False
    assert "embedding" in fast.kinds.values()
