"""Which parameters train in each stage, as name patterns (data, not branches).

Stage 1 trains the projector; stage 2 the projector and the language model; stage 3 the
experts, the meta expert and the dense FFNs of the non-MoE layers (the authors' name filter
also leaves the projector trainable: a choice here). The modality router and the vision tower
never train; the learned-router baseline trains its router in stage 3.

With LoRA (the paper's Med-LoRAMoE) the adapters train instead of the language model's own
weights: stage 2 trains the projector and the adapters, stage 3 the adapters (LLM, experts,
meta expert) and the projector; router and vision tower stay frozen, base weights never move.
"""

from __future__ import annotations

import re

import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.models.moe import names

PROJECTOR = r"^projector\."
LM = r"^(language_model\.)?"  # the multimodal model's child, or a text-only LanguageModel
EXPERTS = re.escape("." + names.EXPERT.split("{j}")[0])
META_EXPERT = re.escape("." + names.META_EXPERT)
ROUTER = re.escape("." + names.ROUTER)
STAGE_TRAINABLE = {
    1: (PROJECTOR,),
    2: (PROJECTOR, LM + r"embedding\.", LM + r"decoder\.", LM + r"output_layer\."),
    # Experts, meta expert and the dense FFNs of the layers that stay dense.
    3: (EXPERTS, META_EXPERT, LM + r"decoder\.layers\.\d+\." + re.escape(names.FFN)
        + r"linear_fc[12]\."),
}
LORA = r"\.lora\.[ab]$"
LORA_STAGE_TRAINABLE = {2: (PROJECTOR, LORA), 3: (LORA,)}
NEVER_TRAINABLE = (r"^vision\.", ROUTER)
LEARNED_ROUTER = ROUTER


def trainable_patterns(stage: int, train_projector: bool = True, learned_router: bool = False,
                       lora: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(patterns that train, patterns that never do) for one stage."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage={stage!r}: must be one of {sorted(STAGE_TRAINABLE)}")
    if lora and stage not in LORA_STAGE_TRAINABLE:
        raise ConfigError(f"--stage {stage} with LoRA (--lora-rank): stage {stage} trains the "
                          "projector only; LoRA applies to stages 2 and 3")
    train = (LORA_STAGE_TRAINABLE if lora else STAGE_TRAINABLE)[stage]
    never = NEVER_TRAINABLE
    if stage == 3 and train_projector:
        train += (PROJECTOR,)
    if stage == 3 and learned_router:
        train += (LEARNED_ROUTER,)
        never = tuple(p for p in never if p != LEARNED_ROUTER)
    return train, never


def apply_stage(model: torch.nn.Module, stage: int, train_projector: bool = True,
                learned_router: bool = False, lora: bool = False) -> list[str]:
    """Set requires_grad for `stage`; returns the names of the trainable parameters."""
    train, never = trainable_patterns(stage, train_projector, learned_router, lora)
    trainable = []
    for name, param in model.named_parameters():
        on = any(re.search(p, name) for p in train) and not any(re.search(p, name) for p in never)
        param.requires_grad_(on)
        if on:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"stage {stage}: no parameter of the model is trainable")
    return trainable
