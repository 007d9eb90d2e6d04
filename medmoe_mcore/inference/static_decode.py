"""One decode step with fixed shapes and no host synchronisation, so that a CUDA graph can
capture it once and replay it per token (`--enable-cuda-graph`, Megatron-LM's flag).

The step runs the model's own modules (QKV, projections, norms, MLPs, the router, the experts'
linears, the LM head) on one new position of every batch slot. What Megatron's static
inference path does with Python integers that change every step is done here with a position
held in a device tensor:

- the new key and value go into Megatron's own KV cache (filled by the prefill, keys stored
  before RoPE, as Megatron stores them; the slots after it zeroed once) with `index_copy_` at
  the position;
- RoPE takes the query's angle from the table by the position and rotates the whole cache's
  keys with the whole table (Megatron rotates keys[:end] each step; the rest is masked);
- attention runs over the full cache length, positions after the new one masked out;
- a Med-MoE layer computes every expert on the step's tokens and weights each by its routing
  probability (zero outside the top-k): the same sum as the routed experts, with no
  data-dependent shapes (at batch 8 and 4 experts top-2 nearly every expert is read anyway).

Layout: one process (TP = EP = 1), local backend, no LoRA adapters; anything else is refused
naming the flag. Tokens equal the uncaptured path (tests/unit/test_static_decode.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.models.moe.experts import LeanSequentialMLP, _local_linear
from medmoe_mcore.models.specs.layers import ParallelResidualTransformerLayer

FLAG = "--enable-cuda-graph"


def check_supported(model) -> None:
    """Refuse, naming the flag, a model the static step does not compute."""
    cfg = model.model_config
    par = cfg.parallel
    if par.tensor_model_parallel_size != 1 or par.expert_model_parallel_size != 1:
        raise ConfigError(f"{FLAG}: the static decode step runs at TP = EP = 1 (this run has "
                          f"TP = {par.tensor_model_parallel_size}, EP = "
                          f"{par.expert_model_parallel_size})")
    if cfg.lora is not None:
        raise ConfigError(f"{FLAG}: a checkpoint with LoRA adapters; merge them first "
                          "(tools/merge_lora.py)")
    for layer in model.language_model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and not isinstance(experts, LeanSequentialMLP):
            raise ConfigError(f"{FLAG}: experts of {type(experts).__name__}; use "
                              "--transformer-impl local")


class StaticDecodeStep:
    """The decode step over a prefilled Megatron static KV cache (`context`)."""

    def __init__(self, model, context, max_length: int):
        check_supported(model)
        self.lm = model.language_model
        self.vocab = model.model_config.language.vocab_size
        self.layers = list(self.lm.decoder.layers)
        self.cache = [context.key_value_memory_dict[layer.layer_number] for layer in self.layers]
        for keys, values in self.cache:  # slots after the prefill are uninitialised memory: a
            keys[context.sequence_len_offset:].zero_()  # NaN there would pass the mask
            values[context.sequence_len_offset:].zero_()  # (0 x NaN); zeros cannot
        self.rope = self.lm.rotary_pos_emb(max_length)  # [max_length, 1, 1, rotary dim]
        self.slots = torch.arange(max_length, device=self.rope.device)

    def __call__(self, decoder_input: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """[1, b, h] embeddings at `position` (a one-element device tensor) -> float32 logits
        [b, vocab]."""
        hidden = decoder_input
        attend = (self.slots <= position).view(1, 1, 1, -1)  # [1, 1, 1, max_length]
        for layer, (keys, values) in zip(self.layers, self.cache):
            hidden = self._layer(layer, hidden, keys, values, position, attend)
        hidden = self.lm.decoder.final_layernorm(hidden)
        logits, _ = self.lm.output_layer(hidden, runtime_gather_output=True)
        return logits[0, :, :self.vocab].float()

    def _layer(self, layer, hidden, keys, values, position, attend):
        normed = layer.input_layernorm(hidden)
        attention = self._attention(layer.self_attention, normed, keys, values, position, attend)
        fused = layer.config.bias_dropout_fusion
        if isinstance(layer, ParallelResidualTransformerLayer):  # one norm feeds both
            mlp = self._mlp(layer.mlp, normed)
            hidden = layer.self_attn_bda(False, fused)(attention, hidden, layer.hidden_dropout)
            return layer.mlp_bda(False, fused)(mlp, hidden, layer.hidden_dropout)
        hidden = layer.self_attn_bda(False, fused)(attention, hidden, layer.hidden_dropout)
        mlp = self._mlp(layer.mlp, layer.pre_mlp_layernorm(hidden))
        return layer.mlp_bda(False, fused)(mlp, hidden, layer.hidden_dropout)

    def _attention(self, attn, normed, keys, values, position, attend):
        query, key, value = attn.get_query_key_value_tensors(normed, None)  # [1, b, n, d]
        keys.index_copy_(0, position, key.to(keys.dtype))
        values.index_copy_(0, position, value.to(values.dtype))
        query = apply_rotary_pos_emb(query, self.rope.index_select(0, position),
                                     config=attn.config)
        rotated = apply_rotary_pos_emb(keys, self.rope, config=attn.config)
        core = attn.core_attention
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), rotated.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3),
            attn_mask=attend, scale=core.scale, enable_gqa=core.groups > 1)
        out = out.permute(2, 0, 1, 3).reshape(1, query.shape[1], -1)
        return attn.linear_proj(out)

    def _mlp(self, mlp, normed):
        if not isinstance(mlp, BaseMoELayer):
            return mlp(normed)
        probs, _ = mlp.router(normed)  # [b, E], zero outside each token's top-k
        tokens = normed.reshape(-1, normed.shape[-1])
        experts = mlp.experts
        output = torch.zeros_like(tokens)
        for e, expert in enumerate(experts.local_experts):
            hidden = experts._activation(_local_linear(expert.linear_fc1, tokens))
            routed = _local_linear(expert.linear_fc2, hidden)
            output = output + (routed * probs[:, e:e + 1]).to(routed.dtype)
        output = output.view_as(normed)
        if mlp.shared_experts is not None:
            output = output + mlp.shared_experts(normed)
        return output, None


class GraphedDecodeStep:
    """A StaticDecodeStep captured once as a CUDA graph and replayed per token; its inputs
    are copied into the graph's static buffers."""

    def __init__(self, step: StaticDecodeStep, decoder_input: torch.Tensor,
                 position: torch.Tensor):
        self.input = decoder_input.clone()
        self.position = position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (at the step's own slot)
            for _ in range(2):
                step(self.input, self.position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(self.input, self.position)

    def __call__(self, decoder_input: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.input.copy_(decoder_input)
        self.position.copy_(position)
        self.graph.replay()
        return self.output.clone()
