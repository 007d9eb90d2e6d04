"""Med-MoE configs (the authors' `moe_llava_phi` / `moe_llava_stablelm` model types).

`moe` holds the authors' keys (`moe_layers_idx`, `num_experts` per MoE layer, `top_k_experts`,
`router_aux_loss_coef`, ...) plus ours: `router_type`, `routing_granularity`, `renormalize`,
`meta_expert`, `modalities`, `token_dispatcher`.
"""

from huggingface_hub.dataclasses import strict
from transformers import PhiConfig, StableLmConfig


@strict
class MedMoePhiConfig(PhiConfig):
    model_type = "moe_llava_phi"
    moe: dict | None = None
    lm_head_bias: bool = False  # HF Phi-2 has one; the authors' MoE-LLaVA-Phi drops it


@strict
class MedMoeStableLmConfig(StableLmConfig):
    model_type = "moe_llava_stablelm"
    moe: dict | None = None
