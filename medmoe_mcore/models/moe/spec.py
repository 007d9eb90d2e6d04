"""Med-MoE layer spec: Megatron-Core's MoELayer with the modality router and the meta expert.

    O = sum_{i in top-k} G_i * E_i(x) + E_meta(x)

Experts are Megatron's SequentialMLP parameters (biases allowed; the bias is scaled with G like
the rest of the expert output), computed by the backend's experts module (moe/experts.py for
local linears); the meta expert sits in the shared-expert slot.
"""

from __future__ import annotations

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.model import MoEConfig
from medmoe_mcore.models.lora.linears import slot
from medmoe_mcore.models.moe.meta_expert import MetaExpertMLP
from medmoe_mcore.models.moe.modality_router import router_spec
from medmoe_mcore.models.specs.backends import Backend


def moe_mlp_spec(moe: MoEConfig, backend: Backend, lora: LoRAConfig | None = None,
                 gated: bool = False) -> ModuleSpec:
    """Experts use the backend's expert linears; the meta expert its plain ones; with `lora`,
    each expert (and the meta expert) its own adapters when targeted."""
    expert = MLPSubmodules(
        linear_fc1=slot(backend.expert_column_linear, lora, "experts", "column", gated),
        linear_fc2=slot(backend.expert_row_linear, lora, "experts", "expert_row"))
    meta = MLPSubmodules(
        linear_fc1=slot(backend.column_linear, lora, "meta_expert", "column", gated),
        linear_fc2=slot(backend.row_linear, lora, "meta_expert", "row"))
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=backend.experts, submodules=expert),
            shared_experts=ModuleSpec(module=MetaExpertMLP, submodules=meta)
            if moe.meta_expert else None,
            router=router_spec(moe),
        ),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )
