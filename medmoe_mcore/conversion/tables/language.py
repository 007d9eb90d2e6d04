"""One declarative table per model family: weights and config keys, used in both directions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medmoe_mcore.config.flavors import PHI_BLOCK, STABLELM_BLOCK
from medmoe_mcore.conversion.mappings import QKV, Direct, GatedMLP, Mapping, PaddedVocab
from medmoe_mcore.models.moe import names

L = "decoder.layers.{i}."
H = "model.layers.{i}."
# The authors' (DeepSpeed MoE) names of the Med-MoE layer's parts inside an HF decoder layer.
AUTHORS_ROUTER = "mlp.deepspeed_moe.gate.wg."
AUTHORS_EXPERT = "mlp.deepspeed_moe.experts.deepspeed_experts.{j}."
AUTHORS_META_EXPERT = "mlp.meta_moe."


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str
    hf_architecture: str
    weights: tuple[Mapping, ...]
    # (HF config key, LanguageConfig field); dotted HF keys address nested dicts.
    config_keys: tuple[tuple[str, str], ...]
    # Block facts fixed by the family (LanguageConfig fields).
    block: dict[str, Any]
    # HF config values this implementation requires: key -> (value, why).
    requires: dict[str, tuple[Any, str]] = field(default_factory=dict)
    # The Med-MoE export of this family (the authors' MoE-LLaVA model type) and the config
    # keys it adds.
    hf_moe_model_type: str = ""
    hf_moe_architecture: str = ""
    # The dense multimodal export (the authors' LLaVA-Phi / LLaVA-StableLM model type).
    hf_llava_model_type: str = ""
    hf_llava_architecture: str = ""
    moe_config_keys: tuple[tuple[str, str], ...] = ()
    # (top-level key of transformers-4.37-era configs, which the authors' code reads, its
    # transformers 5 key): both written on export, the legacy one read on import.
    legacy_config_keys: tuple[tuple[str, str], ...] = ()

    @property
    def moe_weights(self) -> tuple[Mapping, ...]:
        """The dense table plus router, experts and meta expert in the authors' layout; the
        expert and meta-expert entries are the family's own FFN entries, renamed."""
        ffn = [m for m in self.weights if m.megatron.startswith(L + names.FFN)]
        return (
            *self.weights,
            *(Direct(L + names.ROUTER + kind, H + AUTHORS_ROUTER + kind)
              for kind in ("weight", "bias")),
            *(m.renamed((names.FFN, names.EXPERT), ("mlp.", AUTHORS_EXPERT)) for m in ffn),
            *(m.renamed((names.FFN, names.META_EXPERT), ("mlp.", AUTHORS_META_EXPERT))
              for m in ffn),
        )


# Both families name their embedding, input norm and q/k/v projections alike.
EMBEDDING_AND_QKV = (
    PaddedVocab("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Direct(L + "input_layernorm.weight", H + "input_layernorm.weight"),
    Direct(L + "input_layernorm.bias", H + "input_layernorm.bias"),
    QKV(L + "self_attention.linear_qkv.weight", H + "self_attn.q_proj.weight",
        H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
    QKV(L + "self_attention.linear_qkv.bias", H + "self_attn.q_proj.bias",
        H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
)

COMMON_CONFIG_KEYS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("intermediate_size", "ffn_hidden_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("layer_norm_eps", "layernorm_epsilon"),
    ("rope_parameters.partial_rotary_factor", "rotary_percent"),
    ("rope_parameters.rope_theta", "rotary_base"),
    ("attention_dropout", "attention_dropout"),
)

PHI = Family(
    name="phi",
    hf_model_type="phi",
    hf_architecture="PhiForCausalLM",
    weights=(
        *EMBEDDING_AND_QKV,
        Direct(L + "self_attention.linear_proj.weight", H + "self_attn.dense.weight"),
        Direct(L + "self_attention.linear_proj.bias", H + "self_attn.dense.bias"),
        Direct(L + "mlp.linear_fc1.weight", H + "mlp.fc1.weight"),
        Direct(L + "mlp.linear_fc1.bias", H + "mlp.fc1.bias"),
        Direct(L + "mlp.linear_fc2.weight", H + "mlp.fc2.weight"),
        Direct(L + "mlp.linear_fc2.bias", H + "mlp.fc2.bias"),
        Direct("decoder.final_layernorm.weight", "model.final_layernorm.weight"),
        Direct("decoder.final_layernorm.bias", "model.final_layernorm.bias"),
        PaddedVocab("output_layer.weight", "lm_head.weight"),
        PaddedVocab("output_layer.bias", "lm_head.bias"),
    ),
    config_keys=COMMON_CONFIG_KEYS + (("resid_pdrop", "hidden_dropout"),),
    block=PHI_BLOCK,
    requires={
        "hidden_act": ("gelu_new", "Phi-2 uses gelu_new"),
        "qk_layernorm": (False, "qk_layernorm is not supported yet"),
        "tie_word_embeddings": (False, "tied embeddings are not supported"),
        "embd_pdrop": (0.0, "embedding dropout is not supported"),
    },
    hf_moe_model_type="moe_llava_phi",
    hf_moe_architecture="MedMoePhiForCausalLM",
    hf_llava_model_type="llava_phi",
    hf_llava_architecture="LlavaPhiForCausalLM",
    # HF Phi-2 has an LM-head bias; the authors' MoE-LLaVA-Phi has none.
    moe_config_keys=(("lm_head_bias", "output_layer_bias"),),
    legacy_config_keys=(("partial_rotary_factor", "rope_parameters.partial_rotary_factor"),
                        ("rope_theta", "rope_parameters.rope_theta")),
)

STABLELM = Family(
    name="stablelm",
    hf_model_type="stablelm",
    hf_architecture="StableLmForCausalLM",
    weights=(
        *EMBEDDING_AND_QKV,
        Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        Direct(L + "pre_mlp_layernorm.bias", H + "post_attention_layernorm.bias"),
        GatedMLP(L + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight",
                 H + "mlp.up_proj.weight"),
        Direct(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct("decoder.final_layernorm.bias", "model.norm.bias"),
        PaddedVocab("output_layer.weight", "lm_head.weight"),
    ),
    config_keys=COMMON_CONFIG_KEYS + (("hidden_dropout", "hidden_dropout"),
                                      ("use_qkv_bias", "add_qkv_bias")),
    block={k: v for k, v in STABLELM_BLOCK.items() if k != "add_qkv_bias"},
    requires={
        "hidden_act": ("silu", "StableLM-2 uses SwiGLU with silu"),
        "qk_layernorm": (False, "qk_layernorm=True is not supported yet"),
        "use_parallel_residual": (False, "use_parallel_residual=True is not supported yet"),
        "tie_word_embeddings": (False, "tied embeddings are not supported"),
    },
    hf_moe_model_type="moe_llava_stablelm",
    hf_moe_architecture="MedMoeStableLmForCausalLM",
    hf_llava_model_type="llava_stablelm",
    hf_llava_architecture="LlavaStableLmForCausalLM",
    # The authors' `stablelm_epoch` names.
    legacy_config_keys=(("rope_pct", "rope_parameters.partial_rotary_factor"),
                        ("rope_theta", "rope_parameters.rope_theta"),
                        ("norm_eps", "layer_norm_eps")),
)

FAMILIES = {f.name: f for f in (PHI, STABLELM)}
BY_HF_MODEL_TYPE = {t: f for f in FAMILIES.values()
                    for t in (f.hf_model_type, f.hf_moe_model_type, f.hf_llava_model_type)}
