"""Specs of the CLIP vision tower and the projector, from the same backends as the language
model (Megatron's own local ViT spec masks attention causally: a ViT attends both ways)."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from medmoe_mcore.models.specs.backends import LOCAL, Backend
from medmoe_mcore.models.specs.language import attention_spec, dense_mlp_spec


def vision_layer_spec(backend: Backend = LOCAL) -> ModuleSpec:
    """Pre-LN CLIP encoder layer: LN -> bidirectional attention -> LN -> MLP."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=attention_spec(backend, AttnMaskType.no_mask),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.norm,
            mlp=dense_mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def projector_spec(backend: Backend = LOCAL) -> MLPSubmodules:
    """`mlp2x_gelu`: column-parallel fc1, row-parallel fc2 (output whole on every TP rank)."""
    return MLPSubmodules(linear_fc1=backend.column_linear, linear_fc2=backend.row_linear)
