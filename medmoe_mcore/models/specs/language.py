"""Layer specs of the Phi-2 and StableLM-2 decoders, built from a backend's modules. Which
layer class and which norm placement a model gets is read from its config."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.model import LanguageConfig, MoEConfig
from medmoe_mcore.models.lora.linears import slot
from medmoe_mcore.models.moe.spec import moe_mlp_spec
from medmoe_mcore.models.specs.backends import LOCAL, Backend
from medmoe_mcore.models.specs.layers import ParallelResidualTransformerLayer


def attention_spec(backend: Backend, mask: AttnMaskType = AttnMaskType.causal,
                   lora: LoRAConfig | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=slot(backend.column_linear, lora, "linear_qkv", "column"),
            core_attention=backend.core_attention,
            linear_proj=slot(backend.row_linear, lora, "linear_proj", "row"),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def dense_mlp_spec(backend: Backend, lora: LoRAConfig | None = None,
                   gated: bool = False) -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=slot(backend.column_linear, lora, "linear_fc1", "column", gated),
        linear_fc2=slot(backend.row_linear, lora, "linear_fc2", "row")))


def language_layer_spec(lm: LanguageConfig, backend: Backend = LOCAL,
                        mlp: ModuleSpec | None = None,
                        lora: LoRAConfig | None = None) -> ModuleSpec:
    """Decoder layer spec: parallel residual (Phi-2, one norm) or sequential (StableLM-2)."""
    return ModuleSpec(
        module=ParallelResidualTransformerLayer if lm.parallel_residual else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=attention_spec(backend, lora=lora),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if lm.parallel_residual else backend.norm,
            mlp=mlp or dense_mlp_spec(backend, lora, lm.gated_linear_unit),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def language_block_spec(lm: LanguageConfig, backend: Backend = LOCAL,
                        moe: MoEConfig | None = None,
                        lora: LoRAConfig | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs plus the final norm (Megatron's default final norm refuses SP).

    With `moe`, the layers that `moe.layer_freq` selects get the Med-MoE FFN; with `lora`,
    its target linears get adapters."""
    dense = language_layer_spec(lm, backend, lora=lora)
    layers = [dense] * lm.num_layers
    if moe is not None:
        sparse = language_layer_spec(lm, backend, lora=lora, mlp=moe_mlp_spec(
            moe, backend, lora, lm.gated_linear_unit))
        layers = [sparse if is_moe else dense for is_moe in moe.moe_layers(lm.num_layers)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=backend.norm)
