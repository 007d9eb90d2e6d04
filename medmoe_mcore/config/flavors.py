"""Named model presets. Backbone numbers come from the public HF configs of microsoft/phi-2,
stabilityai/stablelm-2-1_6b and openai/clip-vit-large-patch14-336."""

from __future__ import annotations

import dataclasses

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import LanguageConfig, VisionConfig

PHI_BLOCK = dict(family="phi", parallel_residual=True, gated_linear_unit=False,
                 activation="gelu_tanh", add_bias_linear=True, add_qkv_bias=True,
                 output_layer_bias=True)
STABLELM_BLOCK = dict(family="stablelm", parallel_residual=False, gated_linear_unit=True,
                      activation="silu", add_bias_linear=False, add_qkv_bias=True,
                      output_layer_bias=False)

LANGUAGE_FLAVORS = {
    "phi2": LanguageConfig(
        **PHI_BLOCK, vocab_size=51200, hidden_size=2560, num_layers=32, num_attention_heads=32,
        num_query_groups=32, ffn_hidden_size=10240, max_position_embeddings=2048,
        rotary_percent=0.4),
    "stablelm2_1_6b": LanguageConfig(
        **STABLELM_BLOCK, vocab_size=100352, hidden_size=2048, num_layers=24,
        num_attention_heads=32, num_query_groups=32, ffn_hidden_size=5632,
        max_position_embeddings=4096, rotary_percent=0.25),
    # CPU demos and tests: Phi-shaped, a few hundred thousand parameters.
    "tiny": LanguageConfig(
        **PHI_BLOCK, vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=4, ffn_hidden_size=256, max_position_embeddings=512,
        rotary_percent=0.5, make_vocab_size_divisible_by=8),
    "tiny_stablelm": LanguageConfig(
        **STABLELM_BLOCK, vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=176, max_position_embeddings=512,
        rotary_percent=0.25, make_vocab_size_divisible_by=8),
}


def language_flavor(name: str) -> LanguageConfig:
    if name not in LANGUAGE_FLAVORS:
        raise ConfigError(f"flavor={name!r}: unknown; choose from {sorted(LANGUAGE_FLAVORS)}")
    return dataclasses.replace(LANGUAGE_FLAVORS[name])


def medmoe_language(name: str) -> LanguageConfig:
    """The flavor as the language model of Med-MoE: the authors' LlavaPhi drops Phi-2's
    LM-head bias (so do LLaVA's classes), which keeps every export computing like theirs."""
    return dataclasses.replace(language_flavor(name), output_layer_bias=False)


VISION_FLAVORS = {
    # CLIP ViT-L/14-336, feature layer -2: 23 of its 24 layers run (576 image tokens).
    "clip_vit_l14_336": VisionConfig(hidden_size=1024, num_layers=23, source_num_layers=24,
                                     num_attention_heads=16, ffn_hidden_size=4096,
                                     image_size=336, patch_size=14),
    # CPU demos and tests: 56 px / patch 14 = 16 image tokens.
    "tiny_clip": VisionConfig(hidden_size=32, num_layers=2, source_num_layers=3,
                              num_attention_heads=4, ffn_hidden_size=64, image_size=56,
                              patch_size=14),
}
# The vision tower each language flavor pairs with in a Med-MoE model.
VISION_OF = {"phi2": "clip_vit_l14_336", "stablelm2_1_6b": "clip_vit_l14_336",
             "tiny": "tiny_clip", "tiny_stablelm": "tiny_clip"}


def vision_flavor(language_flavor_name: str, image_token_id: int) -> VisionConfig:
    return dataclasses.replace(VISION_FLAVORS[VISION_OF[language_flavor_name]],
                               image_token_id=image_token_id)
