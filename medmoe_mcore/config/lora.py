"""LoRA's place in the config tree (config/model.py's ModelConfig.lora): saved with the model, its
fields also the `--lora-*` flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medmoe_mcore.config.fields import option, require

# LoRA's targets: Megatron-Bridge's names for the attention and dense FFN linears, and the
# Med-MoE layer's routed experts and meta expert (each expert its own adapters).
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "experts",
                "meta_expert")


@dataclass
class LoRAConfig:
    """LoRA adapters beside the language model's linears (the paper's Med-LoRAMoE, Tables 7-8):
    y = W x + (alpha / rank) B A dropout(x), base weights frozen. Defaults are LLaVA's (and
    MoE-LLaVA's) LoRA recipe: alpha = 2 x rank, dropout 0.05, every linear of the LLM."""

    rank: Optional[int] = option(None, "LoRA rank r; with it the run trains LoRA adapters "
                                 "(base weights frozen) instead of the full stage set",
                                 flag="--lora-rank")
    alpha: Optional[float] = option(None, "LoRA scale numerator: the update is alpha / r x B A "
                                    "(default 2 x rank, LLaVA's r=128 / alpha=256)",
                                    flag="--lora-alpha")
    dropout: float = option(0.05, "dropout on the adapters' input (LLaVA's 0.05)",
                            flag="--lora-dropout")
    # None: every target the model has (experts and meta expert only in MoE layers).
    target_modules: Optional[list[str]] = option(
        None, f"linears that get adapters, any of {', '.join(LORA_TARGETS)} (linear_fc1/2: "
        "the FFNs of dense layers, gate+up / down for StableLM; default: all the model has)",
        flag="--lora-target-modules")
    init_seed: int = 0  # A's draw (set from --seed when a run adds the adapters)

    def __post_init__(self):
        if self.alpha is None and isinstance(self.rank, int):
            self.alpha = 2.0 * self.rank

    def resolve_targets(self, moe) -> "LoRAConfig":
        """Default targets: those the model has (`moe`: the MoEConfig, or None)."""
        if self.target_modules is None:
            has = {"experts": moe is not None, "meta_expert": moe is not None and moe.meta_expert}
            self.target_modules = [t for t in LORA_TARGETS if has.get(t, True)]
        return self

    def validate(self, moe) -> None:
        p = "lora"
        require(isinstance(self.rank, int) and self.rank >= 1,
                f"{p}.rank={self.rank!r}: must be a positive integer (--lora-rank)")
        require(self.alpha > 0, f"{p}.alpha={self.alpha}: must be > 0 (--lora-alpha)")
        require(0.0 <= self.dropout < 1.0,
                f"{p}.dropout={self.dropout}: must be in [0, 1) (--lora-dropout)")
        targets = self.target_modules or []
        unknown = [t for t in targets if t not in LORA_TARGETS]
        require(targets and not unknown and len(set(targets)) == len(targets),
                f"{p}.target_modules={targets!r}: one or more distinct names of "
                f"{list(LORA_TARGETS)} (--lora-target-modules)")
        absent = [t for t in targets if (t in ("experts", "meta_expert") and moe is None)
                  or (t == "meta_expert" and moe is not None and not moe.meta_expert)]
        require(not absent, f"{p}.target_modules: the model has no {', '.join(absent)} "
                f"({'dense model' if moe is None else 'moe.meta_expert=False'})")
