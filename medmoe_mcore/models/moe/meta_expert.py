"""The meta expert: one always-on FFN added unweighted to the routed experts' output."""

from __future__ import annotations

from copy import copy

from megatron.core.transformer.mlp import MLP, MLPSubmodules

from medmoe_mcore.config.fields import ConfigError


class MetaExpertMLP(MLP):
    """The always-on meta expert in Megatron's shared-expert slot.

    Megatron's SharedExpertMLP refuses biases; Phi-2's FFN has them, so this is a plain MLP of
    the shared-expert size that returns `output + bias` (MoELayer adds it to the routed output).
    """

    def __init__(self, config, submodules: MLPSubmodules, gate: bool = False,
                 pg_collection=None):
        if gate:
            raise ConfigError("moe_shared_expert_gate=True: the meta expert is added unweighted")
        config = copy(config)
        config.ffn_hidden_size = config.moe_shared_expert_intermediate_size
        super().__init__(config=config, submodules=submodules,
                         tp_group=pg_collection.tp if pg_collection is not None else None)

    def forward(self, hidden_states, **kwargs):
        output, bias = super().forward(hidden_states)
        return output if bias is None else output + bias
