"""Med-MoE models for `transformers`, in the authors' (MoE-LLaVA) parameter layout:

    model.image_tower.image_tower.vision_model.*                       CLIP vision tower
    model.mm_projector.{0,2}.*                                         mlp2x_gelu projector
    model.layers.{i}.mlp.deepspeed_moe.gate.wg.{weight,bias}          modality router
    model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.*  expert j
    model.layers.{i}.mlp.meta_moe.*                                   meta expert

MoE: O = sum_{i in top-k} G_i * E_i(x) + E_meta(x), G = softmax over all experts (float32),
renormalised over the top-k when `moe.renormalize` (the authors' top-2; their top-1 is not).
No capacity limit, no token dropping. The second expert is the plain second-largest
probability: the authors' code draws it with Gumbel noise, at inference too.

Images: each `image_token_index` in `input_ids` (the processor expands `<image>` into one per
patch) takes one projected patch feature of CLIP's hidden state `mm_vision_select_layer`, CLS
dropped. Written for transformers 4.57 and 5.x alike.
"""

import inspect

import torch
from torch import nn
from transformers import CLIPVisionConfig, PhiForCausalLM, StableLmForCausalLM
from transformers.models.clip.modeling_clip import (
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPVisionEmbeddings,
)
from transformers.models.phi.modeling_phi import PhiMLP
from transformers.models.stablelm.modeling_stablelm import StableLmMLP

from .configuration_medmoe import (
    LlavaPhiConfig,
    LlavaStableLmConfig,
    MedMoePhiConfig,
    MedMoeStableLmConfig,
)


class _Gate(nn.Module):
    def __init__(self, hidden_size, num_experts, bias):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=bias, dtype=torch.float32)


class _Experts(nn.Module):
    def __init__(self, config, mlp_class, num_experts):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(mlp_class(config) for _ in range(num_experts))


class _DeepSpeedMoE(nn.Module):
    def __init__(self, config, mlp_class, num_experts, gate_bias):
        super().__init__()
        self.gate = _Gate(config.hidden_size, num_experts, gate_bias)
        self.experts = _Experts(config, mlp_class, num_experts)


class MedMoeBlock(nn.Module):
    def __init__(self, config, mlp_class, num_experts):
        super().__init__()
        moe = config.moe
        self.topk = moe["top_k_experts"]
        self.renormalize = moe.get("renormalize", False)
        self.sample_routing = moe.get("routing_granularity", "token") == "sample"
        # The modality router has a bias; Megatron's learned router has one when the
        # backbone's linear layers do (Phi-2).
        self.deepspeed_moe = _DeepSpeedMoE(config, mlp_class, num_experts,
                                           moe.get("router_bias", True))
        self.meta_moe = mlp_class(config) if moe.get("meta_expert", True) else None

    def routing(self, x):
        """[B, S, H] -> combine weights [B, S, E] ([B, 1, E] with sample routing), zero
        outside the top-k."""
        wg = self.deepspeed_moe.gate.wg
        x = x.float()
        if self.sample_routing:
            x = x.mean(dim=1, keepdim=True)
        scores = torch.softmax(nn.functional.linear(x, wg.weight.float(),
                                                    None if wg.bias is None else wg.bias.float()),
                               dim=-1)
        top, index = scores.topk(self.topk, dim=-1)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter(-1, index, top)

    def forward(self, hidden_states):
        weights = self.routing(hidden_states).expand(*hidden_states.shape[:2], -1)
        out = torch.zeros_like(hidden_states)
        for j, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            chosen = weights[..., j] > 0
            if chosen.any():
                w = weights[..., j][chosen].unsqueeze(-1)
                out[chosen] += (w * expert(hidden_states[chosen]).float()).to(out.dtype)
        if self.meta_moe is not None:
            out = out + self.meta_moe(hidden_states)
        return out


def _install_moe(model, config, mlp_class):
    moe = getattr(config, "moe", None)
    if not moe:
        return
    experts = moe["num_experts"]
    for pos, layer in enumerate(moe["moe_layers_idx"]):
        n = experts[pos] if isinstance(experts, (list, tuple)) else experts
        model.model.layers[layer].mlp = MedMoeBlock(config, mlp_class, n)


class _VisionModel(nn.Module):
    """CLIP's vision transformer under the names both transformers 4 and 5 write."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_state(self, pixel_values, layer: int):
        """hidden_states[layer] of CLIPVisionModel (0 = embeddings, -1 = last layer)."""
        layers = self.encoder.layers
        count = layer % (len(layers) + 1)
        # A non-persistent buffer that loading from the meta device leaves uninitialised
        # inside a non-CLIP PreTrainedModel: set it here, in every transformers version.
        self.embeddings.position_ids = torch.arange(
            self.embeddings.num_positions, device=pixel_values.device).expand((1, -1))
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        for block in layers[:count]:
            out = block(h, None, None) if _CLIP_LAYER_TAKES_CAUSAL_MASK else block(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return h


# transformers 4 CLIP layers take (states, mask, causal_mask) and return a tuple; 5: (states, mask).
_CLIP_LAYER_TAKES_CAUSAL_MASK = "causal_attention_mask" in inspect.signature(
    CLIPEncoderLayer.forward).parameters


class _ImageTower(nn.Module):
    """The authors' image tower wrapper (`image_tower.image_tower.vision_model`)."""

    def __init__(self, config):
        super().__init__()
        self.image_tower = nn.Module()
        self.image_tower.vision_model = _VisionModel(config)


def _install_vision(model, config):
    if getattr(config, "vision_config", None) is None:
        return
    fields = {k: v for k, v in config.vision_config.items() if k != "model_type"}
    vision = CLIPVisionConfig(**fields)
    vision._attn_implementation = "eager"
    model.model.image_tower = _ImageTower(vision)
    model.model.mm_projector = nn.Sequential(
        nn.Linear(vision.hidden_size, config.hidden_size), nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size))


class _MedMoeCausalLM:
    """What every Med-MoE class adds to its family's causal LM: LM-head bias choice, MoE
    layers, image tower + projector, and image features spliced into the embeddings."""

    def _medmoe_init(self, config, mlp_class):
        if not getattr(config, "lm_head_bias", True):
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _install_moe(self, config, mlp_class)
        _install_vision(self, config)
        self.post_init()

    def image_features(self, pixel_values):
        """[n, 3, H, W] -> [n, patches, hidden]: CLIP's selected layer, CLS dropped, projected."""
        vision = self.model.image_tower.image_tower.vision_model
        dtype = vision.embeddings.patch_embedding.weight.dtype
        hidden = vision.hidden_state(pixel_values.to(dtype),
                                     getattr(self.config, "mm_vision_select_layer", -2))
        return self.model.mm_projector(hidden[:, 1:])

    def embed_multimodal(self, input_ids, pixel_values):
        is_image = input_ids == self.config.image_token_index
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if is_image.any():
            if pixel_values is None:
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but no "
                                 "pixel_values were given")
            features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
            if features.shape[0] != int(is_image.sum()):
                raise ValueError(f"{int(is_image.sum())} image tokens for {features.shape[0]} "
                                 "image patches (one <image> per image, expanded by the "
                                 "processor)")
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, pixel_values=None, **kwargs):
        # The cache argument's name changed between transformers 4 and 5: passed on as is.
        if inputs_embeds is None and input_ids is not None and \
                getattr(self.config, "vision_config", None) is not None:
            inputs_embeds, input_ids = self.embed_multimodal(input_ids, pixel_values), None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["pixel_values"] = pixel_values
        return inputs


class MedMoePhiForCausalLM(_MedMoeCausalLM, PhiForCausalLM):
    config_class = MedMoePhiConfig

    def __init__(self, config):
        super().__init__(config)
        self._medmoe_init(config, PhiMLP)


class LlavaPhiForCausalLM(MedMoePhiForCausalLM):
    config_class = LlavaPhiConfig


class MedMoeStableLmForCausalLM(_MedMoeCausalLM, StableLmForCausalLM):
    config_class = MedMoeStableLmConfig

    def __init__(self, config):
        super().__init__(config)
        self._medmoe_init(config, StableLmMLP)


class LlavaStableLmForCausalLM(MedMoeStableLmForCausalLM):
    config_class = LlavaStableLmConfig
