import pytest
import torch

from medmoe_mcore.config.flavors import PHI_BLOCK
from medmoe_mcore.config.model import LanguageConfig
from medmoe_mcore.conversion.mappings import QKV, Direct, GatedMLP, PaddedVocab


def lm(heads=6, groups=2, hidden=48, vocab=997):
    return LanguageConfig(**PHI_BLOCK, vocab_size=vocab, hidden_size=hidden, num_layers=2,
                          num_attention_heads=heads, num_query_groups=groups,
                          ffn_hidden_size=64, max_position_embeddings=64, rotary_percent=0.5)


@pytest.mark.parametrize("heads,groups", [(6, 6), (6, 2), (6, 1), (5, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_round_trip(heads, groups, bias):
    cfg = lm(heads, groups, hidden=heads * 8)
    hn, h = cfg.head_dim, cfg.hidden_size
    rest = () if bias else (h,)
    q, k, v = (torch.randn(heads * hn, *rest), torch.randn(groups * hn, *rest),
               torch.randn(groups * hn, *rest))
    m = QKV("qkv", "q", "k", "v")
    fused = m.to_megatron([q, k, v], cfg)
    assert fused.shape[0] == (heads + 2 * groups) * hn
    for a, b in zip(m.to_hf(fused, cfg), (q, k, v)):
        assert torch.equal(a, b)


def test_qkv_layout_is_grouped_q_then_k_then_v():
    cfg = lm(heads=4, groups=2, hidden=8)  # head_dim 2, 2 q heads per group
    q = torch.arange(8.0)
    k = 100 + torch.arange(4.0)
    v = 200 + torch.arange(4.0)
    fused = QKV("qkv", "q", "k", "v").to_megatron([q, k, v], cfg)
    assert fused.tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


def test_gated_mlp_round_trip_and_order():
    gate, up = torch.randn(10, 4), torch.randn(10, 4)
    m = GatedMLP("fc1", "gate", "up")
    fused = m.to_megatron([gate, up], lm())
    assert torch.equal(fused[:10], gate)
    g2, u2 = m.to_hf(fused, lm())
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_padded_vocab_round_trip():
    cfg = lm(vocab=997)
    w = torch.randn(997, 5)
    m = PaddedVocab("emb", "hf")
    padded = m.to_megatron([w], cfg)
    assert padded.shape == (cfg.padded_vocab_size, 5) and cfg.padded_vocab_size % 128 == 0
    assert torch.count_nonzero(padded[997:]) == 0
    assert torch.equal(m.to_hf(padded, cfg)[0], w)
    with pytest.raises(ValueError, match="rows, expected vocab_size 997"):
        m.to_megatron([torch.randn(998, 5)], cfg)


def test_direct_is_identity():
    t = torch.randn(3)
    assert Direct("a", "b").to_hf(Direct("a", "b").to_megatron([t], lm()), lm())[0] is t
