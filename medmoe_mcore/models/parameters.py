"""Parameter counts of a Med-MoE model in closed form (total, and active per token), to be
checked against the count of the built model.

Total = vision tower + projector + language model, where each MoE layer holds E experts and the
meta expert (copies of the dense FFN) and the router (`Linear(hidden, E)` with bias). Active
per token = the same with the k routed experts only (Megatron's "active parameters"; the
router and the meta expert always run).
"""

from __future__ import annotations

from medmoe_mcore.config.model import LanguageConfig, ModelConfig, VisionConfig


def _ffn(hidden: int, ffn: int, glu: bool, bias: bool) -> int:
    up = ffn * (2 if glu else 1)
    return hidden * up + ffn * hidden + ((up + hidden) if bias else 0)


def ffn_matmul(hidden: int, ffn: int, glu: bool) -> int:
    """The FFN's matrix-product weights (models/flops.py)."""
    return _ffn(hidden, ffn, glu, False)


def attention_matmul(hidden: int, query_groups: int, head_dim: int) -> int:
    """QKV and the output projection's matrix-product weights (models/flops.py)."""
    kv = query_groups * head_dim
    return hidden * (hidden + 2 * kv) + hidden * hidden


def _language_layer_without_ffn(lm: LanguageConfig) -> int:
    h, kv = lm.hidden_size, lm.num_query_groups * lm.head_dim
    qkv = h * (h + 2 * kv) + ((h + 2 * kv) if lm.add_qkv_bias else 0)
    proj = h * h + (h if lm.add_bias_linear else 0)
    norms = 2 * h * (1 if lm.parallel_residual else 2)  # LayerNorm weight + bias
    return qkv + proj + norms


def language_ffn(lm: LanguageConfig) -> int:
    return _ffn(lm.hidden_size, lm.ffn_hidden_size, lm.gated_linear_unit, lm.add_bias_linear)


def _vision(v: VisionConfig, language_hidden: int) -> int:
    d = v.hidden_size
    embeddings = 3 * v.patch_size ** 2 * d + d + (v.num_patches + 1) * d  # conv, CLS, positions
    layer = 2 * 2 * d + 4 * d * d + 4 * d + _ffn(d, v.ffn_hidden_size, False, True)
    projector = d * language_hidden + language_hidden + language_hidden ** 2 + language_hidden
    return embeddings + 2 * d + v.num_layers * layer + projector  # + pre-LN


def expected(cfg: ModelConfig) -> dict:
    """{"total": ..., "active": ...} of `cfg` (dense: both equal)."""
    lm = cfg.language
    ffn = language_ffn(lm)
    dense_layers = total = lm.num_layers * (_language_layer_without_ffn(lm) + ffn)
    head = lm.padded_vocab_size * lm.hidden_size * 2 + 2 * lm.hidden_size  # embed, head, final LN
    head += lm.padded_vocab_size if lm.output_layer_bias else 0
    vision = _vision(cfg.vision, lm.hidden_size) if cfg.vision is not None else 0
    total = active = dense_layers + head + vision
    if cfg.moe is not None:
        moe = cfg.moe
        n = sum(moe.moe_layers(lm.num_layers))
        # the modality router always has a bias; Megatron's TopKRouter when linears have one
        bias = moe.router_type == "modality" or lm.add_bias_linear
        router = moe.num_experts * (lm.hidden_size + (1 if bias else 0))
        meta = ffn if moe.meta_expert else 0
        total += n * (moe.num_experts * ffn + meta + router - ffn)
        active += n * (moe.router_topk * ffn + meta + router - ffn)
    return {"total": total, "active": active}


def counted(model, cfg: ModelConfig) -> dict:
    """{"total": ..., "active": ...} counted on one rank's model at TP = 1: every parameter,
    the routed experts once per expert-parallel rank (each holds E / EP of them); for active,
    k of each layer's experts."""
    ep = cfg.parallel.expert_model_parallel_size
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name) * ep
    total = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    total += routed
    active = total
    if cfg.moe is not None:
        active = total - routed + routed * cfg.moe.router_topk // cfg.moe.num_experts
    return {"total": total, "active": active}
