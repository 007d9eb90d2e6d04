import dataclasses

import pytest

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import LANGUAGE_FLAVORS, language_flavor
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.conversion.hf_config import hf_config_from_language, language_config_from_hf


@pytest.mark.parametrize("name", sorted(LANGUAGE_FLAVORS))
def test_flavors_validate(name):
    ModelConfig(language=language_flavor(name)).validate()


def test_reference_numbers():
    phi, slm = language_flavor("phi2"), language_flavor("stablelm2_1_6b")
    assert (phi.hidden_size, phi.num_layers, phi.ffn_hidden_size, phi.rotary_dim) == (2560, 32, 10240, 32)
    assert (slm.hidden_size, slm.num_layers, slm.ffn_hidden_size, slm.rotary_dim) == (2048, 24, 5632, 16)
    assert phi.parallel_residual and phi.output_layer_bias and not slm.add_bias_linear


def bad(parallel=None, **lm):
    cfg = ModelConfig(language=dataclasses.replace(language_flavor("tiny"), **lm),
                      parallel=parallel or ParallelConfig())
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


def test_messages_name_field_and_value():
    assert bad(ParallelConfig(tensor_model_parallel_size=3)) == (
        "parallel.tensor_model_parallel_size=3 does not divide language.num_attention_heads=4")
    assert bad(num_query_groups=3) == (
        "language.num_attention_heads=4 is not divisible by language.num_query_groups=3")
    assert bad(hidden_size=66) == (
        "language.hidden_size=66 is not divisible by language.num_attention_heads=4")
    assert "rotary dim 3 of head dim 16" in bad(rotary_percent=0.2)
    assert bad(family="llama") == "language.family='llama': must be 'phi' or 'stablelm'"
    assert bad(ParallelConfig(sequence_parallel=True)).startswith(
        "parallel.sequence_parallel=True needs tensor_model_parallel_size > 1")
    assert bad(ParallelConfig(tensor_model_parallel_size=2), ffn_hidden_size=255) == (
        "parallel.tensor_model_parallel_size=2 does not divide language.ffn_hidden_size=255")


def _stablelm_hf(**kw):
    base = {"model_type": "stablelm", "vocab_size": 100, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64, "layer_norm_eps": 1e-5,
            "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000.0},
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "use_qkv_bias": True,
            "hidden_act": "silu", "qk_layernorm": False, "use_parallel_residual": False,
            "tie_word_embeddings": False}
    return {**base, **kw}


def test_hf_config_round_trip():
    hf = _stablelm_hf(bos_token_id=7)
    lm = language_config_from_hf(hf)
    assert lm.family == "stablelm" and lm.gated_linear_unit and lm.rotary_dim == 2
    back = hf_config_from_language(lm, hf)
    assert back["bos_token_id"] == 7 and language_config_from_hf(back) == lm


@pytest.mark.parametrize("key,value,match", [
    ("qk_layernorm", True, "qk_layernorm=True is not supported"),
    ("use_parallel_residual", True, "use_parallel_residual=True is not supported"),
    ("model_type", "llama", "model_type='llama': supported are"),
])
def test_hf_config_refusals(key, value, match):
    with pytest.raises(ConfigError, match=match):
        language_config_from_hf(_stablelm_hf(**{key: value}))


@pytest.mark.parametrize("moe,par,message", [
    (dict(num_experts=6), dict(expert_model_parallel_size=4),
     r"parallel.expert_model_parallel_size=4 does not divide moe.num_experts=6"),
    (dict(num_experts=4, router_topk=5), {}, r"moe.router_topk=5: must be in \[1, num_experts=4\]"),
    (dict(layer_freq=[1, 0]), {}, r"moe.layer_freq=\[1, 0\]: a list needs one 0/1 per layer"),
    (dict(aux_loss_coeff=0.01), {}, r"the fixed modality router has no load-balancing loss"),
    (dict(), dict(expert_tensor_parallel_size=2, tensor_model_parallel_size=2),
     r"expert_tensor_parallel_size=2: experts with biases"),
])
def test_moe_configs_that_cannot_work_fail_by_name(moe, par, message):
    from medmoe_mcore.config.model import MoEConfig

    cfg = ModelConfig(language=language_flavor("tiny"), parallel=ParallelConfig(**par),
                      moe=MoEConfig(**moe))
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_moe_config_round_trips_through_json():
    from medmoe_mcore.config.model import MoEConfig

    cfg = ModelConfig(language=language_flavor("tiny"),
                      moe=MoEConfig(num_experts=6, router_topk=2, layer_freq=[1, 0, 0, 1],
                                    modalities=list("abcdef"))).validate()
    assert ModelConfig.from_json(cfg.to_json()).moe == cfg.moe
    with pytest.raises(ConfigError, match="expert_model_parallel_size=2 / .* need an MoE model"):
        ModelConfig(language=language_flavor("tiny"),
                    parallel=ParallelConfig(expert_model_parallel_size=2)).validate()
