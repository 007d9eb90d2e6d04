"""Training memory per GPU from the config, in closed form: weights, gradient buffers, optimizer
state, the activations a step keeps for backward, and the logits' transient, for a stage, a
layout (TP, SP, EP, DP), the distributed optimizer, full recompute and LoRA.

Parameters are counted on the model built on the meta device (no memory), split by what the
stage trains (training/freezing.py) and by what is an expert (sharded by EP x expert-TP) or
not (sharded by TP; norms replicated). Bytes per parameter as Megatron keeps them:

    weights      params dtype (2 for bf16, 4 for float32)
    gradients    4 per trainable parameter (DDP's float32 buffer, grad_reduce_in_fp32)
    optimizer    Adam's two moments, 8 per trainable parameter, plus a float32 main copy (4)
                 of bf16 weights; divided over the data-parallel ranks with
                 --use-distributed-optimizer (experts over the expert-data-parallel ones)

Activations are elements kept per token and layer, in the params dtype, as our layers keep them
(measured with autograd's saved-tensor hooks over Phi- and StableLM-shaped models and fitted;
tests/unit/test_memory_model.py checks unseen shapes):

    attention side   5.125 h + 3.125 kv  (+ 2 h for a second LayerNorm without parallel
                     residual); the LayerNorm's 2 h is split over TP only with SP
    dense FFN        2 f (GELU) or 5 f (SwiGLU: Megatron's MLP keeps fc1's two halves)
    Med-MoE layer    the dense FFN (the meta expert) + k routed experts (2 f each with GELU, 4 f
                     with SwiGLU: the lean experts' SwiGLU) + 2 k h (permuted and combined)
    after the layers 2 h (final LayerNorm) + the float32 softmax of the logits (V per token)
    LoRA adapters    per layer 5 h + f + 4 r (4 h without parallel residual), and per routed
                     expert 2 h + 2 f + 2 r (3 h); fitted at top-2 with every target

Full recompute keeps each layer's input (h) and one layer's activations at a time. The logits'
gradient (float32, V per token) exists at the start of backward, beside everything kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medmoe_mcore.config.model import ModelConfig

GIB = 1 << 30
_REPLICATED = re.compile(r"(layernorm|layer_norm|\.norm\.)")


@dataclass(frozen=True)
class Step:
    """What one training step runs: the stage, the micro-batch and the layout around it."""

    stage: int
    micro_batch_size: int
    seq_length: int  # tokens per sample, image tokens included
    data_parallel_size: int = 1
    distributed_optimizer: bool = False


def parameter_counts(cfg: ModelConfig, stage: int) -> dict[str, int]:
    """Parameters of the whole model (TP = EP = 1), by {expert, dense} x {trainable, frozen}
    and replicated under TP; counted on the meta device (needs process groups at TP=1)."""
    from medmoe_mcore.conversion.target_model import conversion_model
    from medmoe_mcore.training.freezing import trainable_patterns

    train, never = trainable_patterns(stage, learned_router=cfg.moe is not None and
                                      cfg.moe.router_type == "learned", lora=cfg.lora is not None)
    counts = dict.fromkeys(("expert_trainable", "expert_frozen", "dense_trainable",
                            "dense_frozen", "replicated"), 0)
    for name, p in conversion_model(cfg, meta=True).named_parameters():
        on = any(re.search(t, name) for t in train) and not any(re.search(n, name) for n in never)
        kind = "expert" if ".experts." in name else "dense"
        counts[f"{kind}_{'trainable' if on else 'frozen'}"] += p.numel()
        counts["replicated"] += p.numel() if _REPLICATED.search(name) else 0
    return counts


def activation_elements_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Elements kept per token: 'sharded' (split over TP), 'norm' (split over TP with SP only),
    'layer_input' (per layer, what full recompute keeps), 'logits' (float32, per token)."""
    lm = cfg.language
    h, kv, f = lm.hidden_size, lm.num_query_groups * lm.head_dim, lm.ffn_hidden_size
    norm = 2 * h * (1 if lm.parallel_residual else 2)
    attention = 3.125 * h + 3.125 * kv  # 5.125 h less the LayerNorm's 2 h
    dense_ffn = (5 if lm.gated_linear_unit else 2) * f
    moe_layers = sum(cfg.moe.moe_layers(lm.num_layers)) if cfg.moe is not None else 0
    routed = 0.0
    if moe_layers:
        k = cfg.moe.router_topk
        routed = k * (4 if lm.gated_linear_unit else 2) * f + 2 * k * h
    if cfg.lora is not None:  # every linear's adapter: its dropped-out input, A's output
        r = cfg.lora.rank
        dense_ffn += (5 if lm.parallel_residual else 4) * h + f + 4 * r
        if moe_layers:
            routed += k * ((2 if lm.parallel_residual else 3) * h + 2 * f + 2 * r)
    return {"sharded": lm.num_layers * (attention + dense_ffn) + moe_layers * routed,
            "norm": lm.num_layers * norm + 2 * h, "layer_input": h,
            "per_layer_max": attention + dense_ffn + routed + norm,
            "logits": lm.padded_vocab_size}


def plan(cfg: ModelConfig, step: Step, counts: dict[str, int] | None = None) -> dict[str, float]:
    """Bytes per GPU of one training step at `cfg.parallel`'s layout; `counts` from
    parameter_counts (computed when not given)."""
    counts = counts or parameter_counts(cfg, step.stage)
    par = cfg.parallel
    tp, ep, etp = (par.tensor_model_parallel_size, par.expert_model_parallel_size,
                   par.expert_tensor_parallel_size)
    dp = step.data_parallel_size
    expert_dp = max(1, tp * dp // (ep * etp))  # the experts' data-parallel ranks
    width = 2 if cfg.params_dtype in ("bfloat16", "float16") else 4
    replicated = counts["replicated"]
    dense = counts["dense_trainable"] + counts["dense_frozen"]
    local_dense = (dense - replicated) / tp + replicated
    dense_share = local_dense / dense if dense else 0.0
    expert_share = 1 / (ep * etp)
    expert = counts["expert_trainable"] + counts["expert_frozen"]
    trainable_dense = counts["dense_trainable"] * dense_share
    trainable_expert = counts["expert_trainable"] * expert_share
    state = 8 + (4 if width == 2 else 0)
    shard_dense = dp if step.distributed_optimizer else 1
    shard_expert = expert_dp if step.distributed_optimizer else 1
    out = {
        "weights": (local_dense + expert * expert_share) * width,
        "gradients": (trainable_dense + trainable_expert) * 4,
        "optimizer": state * (trainable_dense / shard_dense + trainable_expert / shard_expert),
    }
    per_token = activation_elements_per_token(cfg)
    tokens = step.micro_batch_size * step.seq_length
    norm_split = tp if par.sequence_parallel else 1
    if cfg.recompute_granularity == "full":
        if (cfg.recompute_method or "uniform") != "uniform" or (cfg.recompute_num_layers or 1) > 1:
            raise ValueError("the memory model covers full recompute one layer at a time "
                             "(--recompute-method uniform, --recompute-num-layers 1)")
        kept = cfg.language.num_layers * per_token["layer_input"] / norm_split \
            + per_token["per_layer_max"] / tp
    else:
        kept = per_token["sharded"] / tp + per_token["norm"] / norm_split
    logits = tokens * per_token["logits"] / tp * 4
    out["activations"] = tokens * kept * width + logits
    out["logits_gradient"] = logits
    out["total"] = sum(out.values())
    return out


def in_gib(plan_bytes: dict[str, float]) -> dict[str, float]:
    return {k: round(v / GIB, 2) for k, v in plan_bytes.items()}
