"""Med-MoE configs under the authors' model types: `llava_phi` / `llava_stablelm` (dense,
stages 1-2) and `moe_llava_phi` / `moe_llava_stablelm` (Med-MoE, stage 3).

No new dataclass fields, so that the same file loads in transformers 4 (keyword attributes)
and 5 (strict dataclass configs keep unknown keys as attributes). Keys beside the backbone's:
`moe` (the authors' MoE-LLaVA keys plus `router_type`, `routing_granularity`, `renormalize`,
`meta_expert`, `modalities`, `token_dispatcher`), `lm_head_bias`, and for multimodal models
`vision_config` (CLIPVisionConfig dict), `mm_vision_select_layer`, `image_token_index`.
"""

from transformers import PhiConfig, StableLmConfig


class LlavaPhiConfig(PhiConfig):
    model_type = "llava_phi"


class MedMoePhiConfig(PhiConfig):
    model_type = "moe_llava_phi"


class LlavaStableLmConfig(StableLmConfig):
    model_type = "llava_stablelm"


class MedMoeStableLmConfig(StableLmConfig):
    model_type = "moe_llava_stablelm"
