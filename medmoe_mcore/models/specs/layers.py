"""Transformer layer variants that Megatron-Core does not ship."""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ParallelResidualTransformerLayer(TransformerLayer):
    """h = x + attn(ln(x)) + mlp(ln(x)): one input norm feeds attention and MLP (Phi-2, GPT-J).

    Built from the same submodules as Megatron's TransformerLayer (its spec sets
    `pre_mlp_layernorm` to IdentityOp); only the wiring of the forward differs.
    """

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **unused):
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attention_output_with_bias = self.self_attention(
            normed,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_output_with_bias = self.mlp(normed, padding_mask=padding_mask)
        fused = self.config.bias_dropout_fusion
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, fused)(
                attention_output_with_bias, residual, self.hidden_dropout)
            hidden_states = self.mlp_bda(self.training, fused)(
                mlp_output_with_bias, hidden_states, self.hidden_dropout)
        output = make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
        return output, context


class ExpertRowParallelLinear(RowParallelLinear):
    """With a one-rank expert-TP group Megatron skips its explicit expert path only when
    EP = 1; the output then goes through a no-op reduce that returns its input as a view, and
    the expert MLP adds the probability-scaled bias in place, which autograd forbids. Nothing
    needs reducing over one rank, so the explicit path is right. (Expert parameter tags are
    set for every backend by models/moe/expert_params.py.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_expert and self.tp_group.size() == 1:
            self.explicit_expert_comm = True
