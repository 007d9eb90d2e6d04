"""Functions that derive every Megatron-Core `TransformerConfig` from our one config (and, for
Megatron's fusions left unset, the run's device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.transformer_config import TransformerConfig

from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.config.parallel import FUSED_ACTIVATION_OF_FLAG, ParallelConfig
from medmoe_mcore.runtime.parallel import device


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF gelu_new (Megatron's fast_gelu) as PyTorch's one fused kernel: the same formula,
    but Megatron's Python version makes ~8 elementwise passes over the FFN activations."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}
# Megatron picks its fused bias + activation kernel by `activation_func`, and its fused kernel
# for F.gelu is the tanh form: under the fusion, Phi-2's gelu_new is named F.gelu.
FUSED_ACTIVATION_FUNC = {"gelu_tanh": F.gelu, "silu": F.silu}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Megatron's fusions' default per device (docs/training.md): their functions are torch.compile'd
# on first call; on CPU that costs seconds per process and gains nothing measurable.
FUSED_BY_DEFAULT = {"cuda": True, "cpu": False}


def fusions(parallel: ParallelConfig, activation: str, gated: bool, params_dtype: str
            ) -> dict[str, bool]:
    """Which of Megatron's fusions a run uses: each flag as given, unset ones by device; an
    activation fusion only for the activation its kernel computes, the cross-entropy fusion
    only in bfloat16 (its gradient is bfloat16), RoPE fusion only with TE (the config's
    validation refuses these flags typed against the model)."""
    default = FUSED_BY_DEFAULT[device().type]
    chosen = {name: default if getattr(parallel, name) is None else getattr(parallel, name)
              for name in ("bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion",
                           "cross_entropy_loss_fusion")}
    activation_flag = next((name for name, act in FUSED_ACTIVATION_OF_FLAG.items()
                            if act == (activation, gated)), None)
    rope = parallel.apply_rope_fusion
    return dict(bias_activation_fusion=activation_flag is not None and chosen[activation_flag],
                bias_dropout_fusion=chosen["bias_dropout_fusion"],
                cross_entropy_loss_fusion=chosen["cross_entropy_loss_fusion"]
                and params_dtype == "bfloat16",
                apply_rope_fusion=parallel.transformer_impl != "local" and rope is not False)


def _common(cfg: ModelConfig, use_cpu_initialization: bool, perform_initialization: bool,
            sequence_parallel: bool) -> dict:
    """Fields every component shares: layout, dtype, the unfused kernels (the language model
    replaces them with the run's fusions)."""
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


def _fusion_fields(cfg: ModelConfig) -> dict:
    """Megatron's TE-free fusions of the language model (the vision tower's quick-GELU and
    the projector's erf GELU have no fused kernel that computes them, so they never fuse)."""
    lm = cfg.language
    fields = fusions(cfg.parallel, lm.activation, lm.gated_linear_unit, cfg.params_dtype)
    if cfg.moe is not None and cfg.parallel.transformer_impl != "local" and \
            not lm.gated_linear_unit:  # Megatron's own experts: no fused GELU with the weight
        fields["bias_activation_fusion"] = False
    if fields["bias_activation_fusion"]:
        fields["activation_func"] = FUSED_ACTIVATION_FUNC[lm.activation]
    if fields["cross_entropy_loss_fusion"]:
        fields["cross_entropy_fusion_impl"] = "native"
    return fields


def expert_activation(config: TransformerConfig):
    """The activation the lean experts apply to fc1's biased output: the config's own, or under
    the bias-activation fusion the function its fused kernel computes (Megatron's bias-SwiGLU
    kernel itself; tanh-GELU, already one kernel, with the bias inside fc1's GEMM)."""
    if not config.bias_activation_fusion:
        return config.activation_func
    if config.gated_linear_unit:
        return lambda x: bias_swiglu_impl(x, None)
    return gelu_tanh


def language_transformer_config(cfg: ModelConfig, use_cpu_initialization: bool = False,
                                perform_initialization: bool = True) -> TransformerConfig:
    """TransformerConfig of the language model; `cfg` must be validated."""
    lm = cfg.language
    shape = _block_shape(lm)
    fused = _fusion_fields(cfg)
    shape["activation_func"] = fused.pop("activation_func", shape["activation_func"])
    common = _common(cfg, use_cpu_initialization, perform_initialization,
                     cfg.parallel.sequence_parallel)
    return TransformerConfig(
        **shape,
        num_query_groups=lm.num_query_groups,
        gated_linear_unit=lm.gated_linear_unit,
        add_bias_linear=lm.add_bias_linear,
        add_qkv_bias=lm.add_qkv_bias,
        hidden_dropout=lm.hidden_dropout,
        attention_dropout=lm.attention_dropout,
        recompute_granularity=cfg.recompute_granularity,
        calculate_per_token_loss=cfg.calculate_per_token_loss,
        recompute_method=(cfg.recompute_method or "uniform")
        if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=(cfg.recompute_num_layers or 1)
        if cfg.recompute_granularity == "full" else None,
        expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        **{**common, **fused},
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
    """Megatron MoE settings of a Med-MoE model: no capacity limit, no token dropping (but for
    a learned-router training run that asks for it); the learned router's balancing and z-loss
    as configured."""
    moe, lm = cfg.moe, cfg.language
    learned = moe.router_type == "learned"
    balancing = (moe.load_balancing_type or ("aux_loss" if moe.aux_loss_coeff > 0 else "none")) \
        if learned else "none"
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
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=(moe.z_loss_coeff or None) if learned else None,
        moe_router_dtype="fp32",
        **(dict(zip(("moe_expert_capacity_factor", "moe_token_drop_policy",
                     "moe_pad_expert_input_to_capacity"), cfg.moe_capacity))
           if cfg.moe_capacity is not None else {}),
        moe_layer_freq=moe.layer_freq,
        moe_grouped_gemm=False,
    )
