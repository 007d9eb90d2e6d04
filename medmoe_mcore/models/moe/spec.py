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

from medmoe_mcore.config import MoEConfig
from medmoe_mcore.models.moe.meta_expert import MetaExpertMLP
from medmoe_mcore.models.moe.router import router_spec
from medmoe_mcore.models.specs.backends import Backend


def moe_mlp_spec(moe: MoEConfig, backend: Backend) -> ModuleSpec:
    """Experts use the backend's expert linears; the meta expert its plain ones."""
    expert = MLPSubmodules(linear_fc1=backend.expert_column_linear,
                           linear_fc2=backend.expert_row_linear)
    meta = MLPSubmodules(linear_fc1=backend.column_linear, linear_fc2=backend.row_linear)
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
