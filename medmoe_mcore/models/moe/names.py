"""Where the Med-MoE layer's parameters live inside a decoder layer (Megatron's MoELayer
submodule names), written once for the conversion tables, upcycling and the freeze sets."""

FFN = "mlp."  # the dense FFN that an MoE layer replaces
ROUTER = "mlp.router."
EXPERT = "mlp.experts.local_experts.{j}."  # {j}: the expert index
META_EXPERT = "mlp.shared_experts."  # Megatron's shared-expert slot
