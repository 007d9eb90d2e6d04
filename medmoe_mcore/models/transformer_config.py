"""Pure functions that derive every Megatron-Core `TransformerConfig` from our one config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from medmoe_mcore.config.model import ModelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF gelu_new (Megatron's fast_gelu) as PyTorch's one fused kernel: the same formula,
    but Megatron's Python version makes ~8 elementwise passes over the FFN activations."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _common(cfg: ModelConfig, use_cpu_initialization: bool, perform_initialization: bool,
            sequence_parallel: bool) -> dict:
    """Fields every component shares: layout, dtype, the unfused (portable) kernels."""
    par = cfg.parallel
    dtype = DTYPES[cfg.params_dtype]
    return dict(
        normalization="LayerNorm",
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )


def _block_shape(shape) -> dict:
    """The transformer-block fields a LanguageConfig and a VisionConfig both give."""
    return dict(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                ffn_hidden_size=shape.ffn_hidden_size,
                num_attention_heads=shape.num_attention_heads, kv_channels=shape.head_dim,
                layernorm_epsilon=shape.layernorm_epsilon,
                activation_func=ACTIVATIONS[shape.activation])


def language_transformer_config(cfg: ModelConfig, use_cpu_initialization: bool = False,
                                perform_initialization: bool = True) -> TransformerConfig:
    """TransformerConfig of the language model; `cfg` must be validated."""
    lm = cfg.language
    return TransformerConfig(
        **_block_shape(lm),
        num_query_groups=lm.num_query_groups,
        gated_linear_unit=lm.gated_linear_unit,
        add_bias_linear=lm.add_bias_linear,
        add_qkv_bias=lm.add_qkv_bias,
        hidden_dropout=lm.hidden_dropout,
        attention_dropout=lm.attention_dropout,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        **_common(cfg, use_cpu_initialization, perform_initialization,
                  cfg.parallel.sequence_parallel),
        **(_moe_fields(cfg) if cfg.moe is not None else {}),
    )


def vision_transformer_config(cfg: ModelConfig, perform_initialization: bool = True
                              ) -> TransformerConfig:
    """CLIP tower: the language model's TP group, no SP (576 tokens; the tower is frozen)."""
    v = cfg.vision
    return TransformerConfig(
        **_block_shape(v),
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **_common(cfg, False, perform_initialization, sequence_parallel=False),
    )


def projector_transformer_config(cfg: ModelConfig, perform_initialization: bool = True
                                 ) -> TransformerConfig:
    """`mlp2x_gelu`: Linear(vision -> H) + GELU + Linear(H -> H), both biased (Megatron's MLP
    with ffn_hidden_size = hidden_size = the language model's width)."""
    v, lm = cfg.vision, cfg.language
    return TransformerConfig(
        num_layers=1,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        activation_func=ACTIVATIONS[v.projector_activation],
        add_bias_linear=True,
        hidden_dropout=0.0,
        **_common(cfg, False, perform_initialization, sequence_parallel=False),
    )


def _moe_fields(cfg: ModelConfig) -> dict:
    """Megatron MoE settings of a Med-MoE model: no capacity limit, no token dropping."""
    moe, lm = cfg.moe, cfg.language
    aux = moe.router_type == "learned" and moe.aux_loss_coeff > 0
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=lm.ffn_hidden_size,
        moe_shared_expert_intermediate_size=lm.ffn_hidden_size if moe.meta_expert else None,
        moe_token_dispatcher_type=moe.token_dispatcher,
        expert_tensor_parallel_size=cfg.parallel.expert_tensor_parallel_size,
        # Learned router: softmax over all experts, then top-k (pre-softmax) keeps the
        # probabilities unnormalised; top-k logits, then softmax renormalises them. (The
        # modality router takes the choice from its spec.)
        moe_router_pre_softmax=not (moe.router_type == "learned" and moe.renormalize),
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff if aux else 0.0,
        moe_router_dtype="fp32",
        moe_layer_freq=moe.layer_freq,
        moe_grouped_gemm=False,
    )
