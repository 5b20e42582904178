"""The transformers-free path for dense decoders gives what the meta-device skeleton gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from driftmerge.errors import InputError
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


def test_without_a_config_extract_refuses_to_guess_unless_asked(caplog):
    shapes = {"blocks.0.proj.weight": (8, 4), "blocks.0.norm.weight": (4,)}
    with pytest.raises(InputError, match="--guess-modules"):
        describe(None, shapes)
    guessed = describe(None, shapes, guess=True)
    assert guessed.source == "names" and guessed.kinds == {"blocks.0.proj.weight": "linear"}
    assert "guessing" in caplog.text


def test_custom_code_models_need_trust_remote_code_or_a_guess():
    config = {"model_type": "foo", "auto_map": {"AutoModelForCausalLM": "modeling_foo.Foo"}}
    with pytest.raises(InputError, match="--trust-remote-code"):
        describe(config, {"x.weight": (4, 4)})
    assert describe(config, {"x.weight": (4, 4)}, guess=True).source == "names"


def test_an_unknown_model_type_is_one_clear_error():
    with pytest.raises(InputError, match="cannot build a no_such_model model"):
        describe({"model_type": "no_such_model"}, {"x.weight": (4, 4)})


def test_renamed_keys_map_to_the_loaded_module(tmp_path):
    """GPT-NeoX saves ``embed_out.weight``; the loaded model calls it ``lm_head``: PEFT must see ``lm_head``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path)
    shapes = _saved_shapes(tmp_path)
    assert "embed_out.weight" in shapes
    arch = describe(cfg.to_dict(), shapes, folder=tmp_path)
    assert arch.targets["embed_out.weight"].path == "lm_head" and arch.task_type == "CAUSAL_LM"


def test_mixtral_experts_map_to_rows_of_the_fused_stack(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32, num_local_experts=3, num_experts_per_tok=2,
    )  # fmt: skip
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    arch = describe(cfg.to_dict(), _saved_shapes(tmp_path), folder=tmp_path)
    w1 = arch.targets["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    w3 = arch.targets["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    w2 = arch.targets["model.layers.0.block_sparse_moe.experts.2.w2.weight"]
    assert (w1.kind, w1.path, w1.experts, w1.expert, w1.rows, w1.dims) == (
        "experts", "model.layers.0.mlp.experts.gate_up_proj", 3, 2, (0, 24), (48, 16)
    )  # fmt: skip
    assert (w3.rows, w2.path, w2.rows, w2.dims) == ((24, 48), "model.layers.0.mlp.experts.down_proj", (0, 16), (16, 24))
    # PEFT nests one wrapper per targeted parameter: gate_up_proj (registered first) sits under down_proj's
    assert (w1.nest, w2.nest) == (1, 0)
    router = arch.targets["model.layers.0.block_sparse_moe.gate.weight"]
    assert (router.kind, router.path) == ("param", "model.layers.0.mlp.gate.weight")


@pytest.mark.parametrize("arch_name", ["mixtral", "gpt_neox"])
def test_the_skeletons_answer_is_cached_and_read_back_the_same(tmp_path, monkeypatch, caplog, arch_name):
    import logging

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MixtralConfig, MixtralForCausalLM

    from driftmerge.io import arch_cache, skeleton

    if arch_name == "mixtral":
        cfg = MixtralConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=32, num_local_experts=3, num_experts_per_tok=2,
        )  # fmt: skip
        MixtralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    else:
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "m")
    shapes, config = _saved_shapes(tmp_path / "m"), cfg.to_dict()
    monkeypatch.setenv("DRIFTMERGE_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="driftmerge")
    built = describe(config, shapes, folder=tmp_path / "m")
    (entry,) = (tmp_path / "cache" / "architectures").glob("*.json")
    calls = []
    monkeypatch.setattr(skeleton, "from_skeleton", lambda *a, **k: calls.append(1))  # the cache must answer
    assert describe(config, shapes, folder=tmp_path / "m") == built and not calls
    assert "from the cache" in caplog.text
    # another shape, another key: the skeleton runs again
    assert arch_cache.cache_key(config, {**shapes, "extra.weight": (2, 2)}) != entry.stem
    # a damaged entry is rebuilt, not an error; with the cache off nothing is read or written
    entry.write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("DRIFTMERGE_CACHE", str(tmp_path / "cache"))
    assert describe(config, shapes, folder=tmp_path / "m") == built
    monkeypatch.setenv("DRIFTMERGE_CACHE", "off")
    entry.unlink()
    assert describe(config, shapes, folder=tmp_path / "m") == built and not entry.exists()


def test_a_cache_that_cannot_be_written_is_passed_by(tmp_path, monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("DRIFTMERGE_CACHE", str(tmp_path / "file"))
    arch = describe(cfg.to_dict(), _saved_shapes(tmp_path / "m"), folder=tmp_path / "m")
    assert arch.targets["embed_out.weight"].path == "lm_head"


def _saved_shapes(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
