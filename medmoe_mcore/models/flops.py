"""Model FLOPs of a training step in closed form, for `--log-throughput` (TFLOP/s per GPU, as
Megatron-LM logs it).

Megatron-LM's convention: every matrix product counts 2 FLOPs per multiply-add, and a trained
network's backward pass costs twice its forward (3x in all), frozen weights included (their
input gradients still run). Our one exception: the CLIP tower is frozen in every stage and its
input is the image, so no backward pass ever runs through it: it counts its forward once.

Per micro-batch of b samples spliced to S language positions (images included, padding too:
the kernels run over it) and n images of T = patches + 1 vision tokens:
  language: 2 b S (matmul weights a token passes through: attention, the dense or active FFNs
            (k experts + the meta expert), the router, the output layer) + 4 b S^2 h per layer
            (QK^T and AV)
  projector: 2 n patches (vision hidden x h + h x h)
  vision:   2 n T (its layers' matmul weights) + 4 n T^2 d per layer + the patch convolution
The forward part is checked against torch's FLOP counter (tests/unit/test_flops.py); the
weights are those of models/parameters.py's closed form without biases and norms.
"""

from __future__ import annotations

from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.models.parameters import attention_matmul, ffn_matmul


def _language_forward(cfg: ModelConfig, batch: int, length: int) -> int:
    lm, moe = cfg.language, cfg.moe
    ffn = ffn_matmul(lm.hidden_size, lm.ffn_hidden_size, lm.gated_linear_unit)
    moe_layers = sum(moe.moe_layers(lm.num_layers)) if moe is not None else 0
    per_token = lm.num_layers * (attention_matmul(lm.hidden_size, lm.num_query_groups,
                                                  lm.head_dim) + ffn)
    if moe_layers:
        routed = moe.router_topk + (1 if moe.meta_expert else 0)
        per_token += moe_layers * ((routed - 1) * ffn + moe.num_experts * lm.hidden_size)
    per_token += lm.padded_vocab_size * lm.hidden_size
    attention_core = 4 * length * length * lm.num_attention_heads * lm.head_dim * lm.num_layers
    return batch * (2 * length * per_token + attention_core)


def _projector_forward(cfg: ModelConfig, images: int) -> int:
    v, h = cfg.vision, cfg.language.hidden_size
    return 2 * images * v.num_patches * (v.hidden_size * h + h * h)


def _vision_forward(cfg: ModelConfig, images: int) -> int:
    v = cfg.vision
    tokens, d = v.num_patches + 1, v.hidden_size
    layer = attention_matmul(d, v.num_query_groups, v.head_dim) + \
        ffn_matmul(d, v.ffn_hidden_size, False)
    patches = 2 * v.num_patches * 3 * v.patch_size ** 2 * d
    return images * (2 * tokens * v.num_layers * layer
                     + 4 * tokens * tokens * d * v.num_layers + patches)


def forward_flops(cfg: ModelConfig, batch: int, length: int, images: int) -> int:
    """One forward pass of a micro-batch (b samples, S spliced positions, n images)."""
    flops = _language_forward(cfg, batch, length)
    if cfg.vision is not None and images:
        flops += _projector_forward(cfg, images) + _vision_forward(cfg, images)
    return flops


def training_flops(cfg: ModelConfig, batch: int, length: int, images: int) -> int:
    """Forward and backward of a micro-batch, Megatron-LM's convention (module docstring)."""
    trained = 3 * _language_forward(cfg, batch, length)
    if cfg.vision is not None and images:
        trained += 3 * _projector_forward(cfg, images) + _vision_forward(cfg, images)
    return trained


def spliced_length(input_ids, image_token_id: int, image_len: int,
                   pad_to_multiple: int = 1) -> int:
    """The language sequence a micro-batch of ids [b, s] becomes (models/medmoe.py's
    splice_images: each placeholder replaced by `image_len` positions, right-padded to the
    longest sample, rounded up to `pad_to_multiple`)."""
    most = int((input_ids == image_token_id).sum(dim=1).max()) if input_ids.numel() else 0
    length = input_ids.shape[1] + most * (image_len - 1)
    return -(-length // pad_to_multiple) * pad_to_multiple
