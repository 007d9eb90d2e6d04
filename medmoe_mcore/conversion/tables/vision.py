"""Declarative tables of the vision side: CLIP tower weights and config keys, the projector,
and the HF checkpoint layouts (where each part lives) of LLaVA-style models. Used in both
directions by conversion/llava.py (and release.py, assemble.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import VisionConfig
from medmoe_mcore.conversion.mappings import QKV, Direct, Mapping, Reshaped

V = "decoder.layers.{i}."
C = "encoder.layers.{i}."

# CLIP vision transformer, names relative to its root (`vision_model.` of a CLIPModel).
CLIP_WEIGHTS: tuple[Mapping, ...] = (
    Reshaped("class_token", "embeddings.class_embedding", (1, 1, -1)),
    Direct("conv1.weight", "embeddings.patch_embedding.weight"),
    Direct("position_embeddings.weight", "embeddings.position_embedding.weight"),
    Direct("ln_pre.weight", "pre_layrnorm.weight"),  # sic: HF's spelling
    Direct("ln_pre.bias", "pre_layrnorm.bias"),
    Direct(V + "input_layernorm.weight", C + "layer_norm1.weight"),
    Direct(V + "input_layernorm.bias", C + "layer_norm1.bias"),
    QKV(V + "self_attention.linear_qkv.weight", C + "self_attn.q_proj.weight",
        C + "self_attn.k_proj.weight", C + "self_attn.v_proj.weight"),
    QKV(V + "self_attention.linear_qkv.bias", C + "self_attn.q_proj.bias",
        C + "self_attn.k_proj.bias", C + "self_attn.v_proj.bias"),
    Direct(V + "self_attention.linear_proj.weight", C + "self_attn.out_proj.weight"),
    Direct(V + "self_attention.linear_proj.bias", C + "self_attn.out_proj.bias"),
    Direct(V + "pre_mlp_layernorm.weight", C + "layer_norm2.weight"),
    Direct(V + "pre_mlp_layernorm.bias", C + "layer_norm2.bias"),
    Direct(V + "mlp.linear_fc1.weight", C + "mlp.fc1.weight"),
    Direct(V + "mlp.linear_fc1.bias", C + "mlp.fc1.bias"),
    Direct(V + "mlp.linear_fc2.weight", C + "mlp.fc2.weight"),
    Direct(V + "mlp.linear_fc2.bias", C + "mlp.fc2.bias"),
)

# CLIP weights that exist in HF but are not run: post_layernorm (LLaVA takes a hidden state,
# not the pooled output) and layers past the feature layer. Import keeps them aside, untouched,
# so that an export is bit-exact.
CLIP_UNUSED = re.compile(r"post_layernorm\.(weight|bias)\Z")
CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")

# The projector as HF LLaVA names it (Megatron: MultimodalProjector's MLP).
PROJECTOR_WEIGHTS: tuple[Mapping, ...] = tuple(
    Direct(f"encoder.linear_fc{n}.{kind}", f"linear_{n}.{kind}")
    for n in (1, 2) for kind in ("weight", "bias"))

# (HF CLIPVisionConfig key, VisionConfig field)
CLIP_CONFIG_KEYS = (
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "ffn_hidden_size"),
    ("image_size", "image_size"),
    ("patch_size", "patch_size"),
    ("layer_norm_eps", "layernorm_epsilon"),
    ("hidden_act", "activation"),
)


@dataclass(frozen=True)
class Layout:
    """Where the parts of a LLaVA-style model live in an HF checkpoint."""

    name: str
    vision: str                                 # root of the CLIP vision transformer
    projector: tuple[tuple[str, str], ...]      # HF-LLaVA projector prefix -> this layout's
    language: str                               # replaces the language tables' "model."
    lm_head: str                                # replaces "lm_head."

    def language_prefixes(self) -> tuple[tuple[str, str], ...]:
        return (("model.", self.language), ("lm_head.", self.lm_head))


def _llava(name, vision, projector, language, lm_head):
    return Layout(name, vision, (("linear_1.", projector + "linear_1."),
                                 ("linear_2.", projector + "linear_2.")), language, lm_head)


LAYOUTS = {
    # What `LlavaForConditionalGeneration.save_pretrained` writes (transformers 5 on disk).
    "llava": _llava("llava", "vision_tower.", "multi_modal_projector.",
                    "language_model.model.", "language_model.lm_head."),
    # llava-hf checkpoints on the hub (CLIPVisionModel keeps its `vision_model.` level).
    "llava-hub": _llava("llava-hub", "vision_tower.vision_model.", "multi_modal_projector.",
                        "language_model.model.", "language_model.lm_head."),
    # transformers 5 module names (state_dict of LlavaForConditionalGeneration).
    "llava-modular": _llava("llava-modular", "model.vision_tower.",
                            "model.multi_modal_projector.", "model.language_model.", "lm_head."),
    # transformers 4.52-4.57 module names.
    "llava-modular-4": _llava("llava-modular-4", "model.vision_tower.vision_model.",
                              "model.multi_modal_projector.", "model.language_model.",
                              "lm_head."),
    # The authors' MoE-LLaVA (LlavaPhi / LlavaStablelm, dense or MoE): mm_projector is an
    # nn.Sequential(Linear, GELU, Linear), hence indices 0 and 2.
    "authors": Layout("authors", "model.image_tower.image_tower.vision_model.",
                      (("linear_1.", "model.mm_projector.0."),
                       ("linear_2.", "model.mm_projector.2.")), "model.", "lm_head."),
}
# CLIP alone: CLIPVisionModel (transformers 5 writes no `vision_model.` level) or CLIPModel.
CLIP_ROOTS = ("", "vision_model.")
_PATCH = "embeddings.patch_embedding.weight"


def relayout(key: str, source: Layout, target: Layout) -> str:
    """The same tensor's name in another layout (the longest matching prefix wins)."""
    pairs = [(source.vision, target.vision), (source.language, target.language),
             (source.lm_head, target.lm_head)]
    pairs += [(dict(source.projector)[k], dict(target.projector)[k]) for k in dict(source.projector)]
    old, new = max(((o, n) for o, n in pairs if key.startswith(o)), key=lambda p: len(p[0]),
                   default=("", None))
    if new is None:
        raise ConfigError(f"{key}: not under any part of layout {source.name}")
    return new + key[len(old):]


def detect_layout(keys) -> Layout:
    keys = set(keys)
    found = [layout for layout in LAYOUTS.values()
             if layout.vision + _PATCH in keys
             and dict(layout.projector)["linear_1."] + "weight" in keys]
    if len(found) != 1:
        raise ConfigError("cannot tell the checkpoint layout: expected exactly one of "
                          + ", ".join(f"{l.name} ({l.vision}{_PATCH} + "
                                      f"{dict(l.projector)['linear_1.']}weight)"
                                      for l in LAYOUTS.values()))
    return found[0]


def detect_clip_root(keys) -> str:
    keys = set(keys)
    for root in CLIP_ROOTS:
        if root + _PATCH in keys:
            return root
    raise ConfigError(f"not a CLIP vision checkpoint: no {' or '.join(r + _PATCH for r in CLIP_ROOTS)}")


def vision_config_from_hf(clip: dict, feature_layer: int, image_token_id: int) -> VisionConfig:
    """`clip`: an HF CLIPVisionConfig dict; `feature_layer`: LLaVA's vision_feature_layer
    (hidden_states index: -2 = output of the second-to-last layer, 0 = embeddings)."""
    fields: dict[str, Any] = {}
    for hf_key, name in CLIP_CONFIG_KEYS:
        if hf_key not in clip:
            raise ConfigError(f"vision config has no {hf_key!r} (needed for vision.{name})")
        fields[name] = clip[hf_key]
    if fields["activation"] not in ("quick_gelu", "gelu"):
        raise ConfigError(f"vision config hidden_act={fields['activation']!r}: supported are "
                          "quick_gelu and gelu")
    if clip.get("num_channels", 3) != 3:
        raise ConfigError(f"vision config num_channels={clip['num_channels']}: RGB (3) only")
    total = clip["num_hidden_layers"]
    layers = total + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= layers <= total:
        raise ConfigError(f"vision_feature_layer={feature_layer} selects no encoder layer of "
                          f"num_hidden_layers={total}")
    return VisionConfig(num_layers=layers, source_num_layers=total,
                        image_token_id=image_token_id, **fields)


def clip_config_from_vision(v: VisionConfig) -> dict:
    """HF CLIPVisionConfig dict with the source's depth (layers past the feature layer are
    written from what import kept aside)."""
    out = {hf_key: getattr(v, name) for hf_key, name in CLIP_CONFIG_KEYS}
    out.update(model_type="clip_vision_model", num_hidden_layers=v.source_num_layers or
               v.num_layers, num_channels=3)
    return out


def feature_layer(v: VisionConfig) -> int:
    """LLaVA's vision_feature_layer for `v` (negative, counted from the source's depth)."""
    return v.num_layers - (v.source_num_layers or v.num_layers) - 1


def is_unused_clip_key(relative: str, v: VisionConfig) -> bool:
    """A CLIP tensor that is not run (kept aside on import, written back on export)."""
    if CLIP_UNUSED.match(relative):
        return True
    m = CLIP_LAYER.match(relative)
    return bool(m) and int(m.group(1)) >= v.num_layers
