"""The one pure function that derives Megatron-Core `TransformerConfig`s from our config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import fast_gelu, quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from medmoe_mcore.config import ModelConfig

# HF gelu_new == Megatron fast_gelu (tanh approximation).
ACTIVATIONS = {"gelu_tanh": fast_gelu, "silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_transformer_config(cfg: ModelConfig, use_cpu_initialization: bool = False,
                                perform_initialization: bool = True) -> TransformerConfig:
    """TransformerConfig of the language model; `cfg` must be validated."""
    lm, par = cfg.language, cfg.parallel
    dtype = DTYPES[cfg.params_dtype]
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.head_dim,
        layernorm_epsilon=lm.layernorm_epsilon,
        normalization="LayerNorm",
        gated_linear_unit=lm.gated_linear_unit,
        activation_func=ACTIVATIONS[lm.activation],
        add_bias_linear=lm.add_bias_linear,
        add_qkv_bias=lm.add_qkv_bias,
        hidden_dropout=lm.hidden_dropout,
        attention_dropout=lm.attention_dropout,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        expert_model_parallel_size=par.expert_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
