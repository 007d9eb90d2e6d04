"""Core attention on torch's scaled_dot_product_attention (models/specs/sdpa.py) computes
what Megatron's unfused DotProductAttention computes: outputs and gradients in float32."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from medmoe_mcore.models.specs.sdpa import SDPAttention


def _pair(groups: int, mask_type, layer_scaling: bool = False):
    cfg = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4,
                            num_query_groups=groups, attention_dropout=0.0,
                            apply_query_key_layer_scaling=layer_scaling,
                            attention_softmax_in_fp32=True)
    return (DotProductAttention(cfg, 3, mask_type, "self"),
            SDPAttention(cfg, 3, mask_type, "self"))


def _qkv(sq, sk, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, 2, h, 16, generator=gen, requires_grad=True)
            for s, h in ((sq, 4), (sk, groups), (sk, groups))]


@pytest.mark.parametrize("groups, mask_type, layer_scaling", [
    (4, AttnMaskType.causal, False),   # the language model
    (2, AttnMaskType.causal, True),    # GQA (StableLM-2), Megatron's query-key layer scaling
    (4, AttnMaskType.no_mask, False),  # the vision tower
])
def test_same_outputs_and_gradients(single_rank, groups, mask_type, layer_scaling):
    ours, megatron = _pair(groups, mask_type, layer_scaling)[::-1]
    results = []
    for module in (megatron, ours):
        q, k, v = _qkv(33, 33, groups)
        out = module(q, k, v, None)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-6


def test_explicit_mask_and_one_query(single_rank):
    megatron, ours = _pair(4, AttnMaskType.causal)
    q, k, v = _qkv(9, 9, 4)
    mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.7
    mask[..., 0] = False  # every query keeps one key
    assert (megatron(q, k, v, mask) - ours(q, k, v, mask)).abs().max() < 1e-6
    q1, k1, v1 = _qkv(1, 12, 4, seed=2)  # decoding: one new query over the cache
    assert (megatron(q1, k1, v1, None) - ours(q1, k1, v1, None)).abs().max() < 1e-6
