"""Core attention on `torch.nn.functional.scaled_dot_product_attention` for the local
backend: the flash / memory-efficient kernels where the device has them (never the
[b, heads, s, s] score tensor of Megatron's unfused `DotProductAttention`), with the same
inputs, outputs and parameters. The layer's mask type decides the mask: causal for the
language model, none for the vision tower; an explicit Megatron mask (True = masked) is
honoured. A one-token query (KV-cache decoding) attends to everything, as Megatron's does.

Subclassing `DotProductAttention` keeps its set-up (heads per TP partition, GQA groups,
softmax scale, dropout probability, sharded state); only the computation differs. Cases the
kernel cannot express (packed sequences, attention bias, sliding windows, softmax offsets)
are refused when the layer is built or called, never computed differently.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.softmax_offset is not None or config.window_size is not None:
            raise ValueError("SDPAttention: softmax offsets and sliding windows are not "
                             "supported (use DotProductAttention)")
        # Megatron divides the scale by the layer number when apply_query_key_layer_scaling
        # and multiplies it back inside the fp32 softmax: the product is what attention uses
        self.scale = self.softmax_scale * (self.layer_number
                                           if config.apply_query_key_layer_scaling else 1)
        self.groups = self.num_attention_heads_per_partition // \
            self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias are not "
                             "supported (use DotProductAttention)")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked; SDPA: True = attend
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != k.shape[2]:
                raise ValueError(f"SDPAttention: causal attention of {sq} queries over "
                                 f"{k.shape[2]} keys (only self-attention or one query)")
            causal = True
        dropout = self.attention_dropout.p if self.training else 0.0
        # dropout draws from Megatron's RNG tracker, as DotProductAttention's does
        rng = tensor_parallel.get_cuda_rng_tracker().fork() \
            if dropout and not self.config.sequence_parallel else nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.scale,
                                                 enable_gqa=self.groups > 1)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
