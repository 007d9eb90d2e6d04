"""The routed experts' compute, lean: Megatron's SequentialMLP parameters and layout, one
expert after another, with the routing weight applied after fc2.

Megatron's SequentialMLP runs each expert through a full MLP module and scales the
[tokens, FFN] activation by the routing weight (then adds the probability-scaled fc2 bias):

    G * (W2 act(W1 x + b1) + b2)   computed as   W2 (G * act(W1 x + b1)) + G * b2

Scaling the [tokens, hidden] output instead is the same sum (float32 rounding apart,
tests/unit/test_moe.py) and touches FFN/hidden times fewer elements, forward and backward. The
parameters are the expert linears' own (same names, shards, tags and checkpoints), read by
`expert_linear` (weight gradients accumulated in place, expert_linear.py): with local linears
an expert's matmul has no communication inside it (the token dispatcher does the expert-TP
reduction), so nothing is skipped. Transformer Engine's expert linears keep Megatron's module
(backends.py), whose kernels they need.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from medmoe_mcore.models.moe.expert_linear import expert_linear, pad_short_block


def _local_linear(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An expert linear without communication, its LoRA adapter's addition included."""
    output = expert_linear(x, linear.weight, linear.bias)
    adapter = getattr(linear, "lora", None)
    return output if adapter is None else output + adapter(x).to(output.dtype)


class LeanSequentialMLP(SequentialMLP):
    """SequentialMLP's experts, computed as `G * (W2 act(W1 x + b1) + b2)` per expert."""

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.gated_linear_unit:
            gate, linear = torch.chunk(x, 2, dim=-1)
            return config.activation_func(gate) * linear
        return config.activation_func(x)

    def _lean_applies(self) -> bool:
        """Megatron's variants this compute does not reproduce run Megatron's own code."""
        c = self.config
        return not (c.moe_apply_probs_on_input or c.fp8 or c.fp4 or c.bias_activation_fusion
                    or c.use_te_activation_func or c.activation_func_clamp_value is not None
                    or c.glu_linear_offset != 0)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        if not self._lean_applies():
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        counts = tokens_per_expert.tolist()
        outputs = []
        for expert, tokens, probs in zip(self.local_experts,
                                         torch.split(permuted_local_hidden_states, counts),
                                         torch.split(permuted_probs, counts)):
            hidden = self._activation(_local_linear(expert.linear_fc1, pad_short_block(tokens)))
            output = _local_linear(expert.linear_fc2, hidden)[:len(tokens)]
            outputs.append((output * probs.unsqueeze(-1)).to(output.dtype))
        return torch.cat(outputs, dim=0), None
