"""LoRA adapters of a Megatron checkpoint -> a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, PEFT's key names) for the release folder of the same checkpoint:

    base = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)

The adapter keys follow the release's own mapping table: B's rows are the base weight's rows,
so B takes the weight's row transform (fused q/k/v -> q_proj, k_proj, v_proj; gate/up ->
gate_proj, up_proj), while A, shared by the fused outputs, is written for each of them: PEFT
computes the same (alpha / r) B A per module. The config is written by `peft.LoraConfig`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.conversion.engine import ConversionError, convert, plan
from medmoe_mcore.conversion.mappings import Mapping

PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped model
WEIGHT = "weight"


class LoRAFactor(Mapping):
    """Factor `a` or `b` of the adapter beside one base weight's mapping."""

    def __init__(self, weight: Mapping, factor: str):
        stem = weight.megatron[:-len(WEIGHT)]
        super().__init__(stem + f"lora.{factor}",
                         tuple(h[:-len(WEIGHT)] + f"lora_{factor.upper()}.{WEIGHT}"
                               for h in weight.hf))
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "factor", factor)

    def to_hf(self, tensor, cfg):
        if self.factor == "b":
            return self.weight.to_hf(tensor, cfg)
        return [tensor] * len(self.hf)

    def to_megatron(self, tensors, cfg):
        if self.factor == "b":
            return self.weight.to_megatron(tensors, cfg)
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ConversionError(f"{self.megatron}: the modules {self.hf} have different "
                                  "lora_A: not one fused Megatron adapter")
        return tensors[0]


def lora_table(weight_table) -> tuple[Mapping, ...]:
    """A and B entries beside every weight entry of a model's table."""
    return tuple(LoRAFactor(m, f) for m in weight_table if m.megatron.endswith("." + WEIGHT)
                 for f in ("a", "b"))


def write_peft_adapter(out: Path, adapters: dict[str, torch.Tensor], cfg: ModelConfig,
                       weight_table, base_keys: set[str]) -> list[str]:
    """`adapters` (Megatron key -> tensor, TP = 1) as a PEFT adapter folder in `out` (which
    exists); every adapter must sit beside a weight of the base model (`base_keys`). Returns
    the adapted HF modules."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    groups = plan(lora_table(weight_table), adapters.keys(), None, to_megatron=False)
    tensors = dict(convert(groups, adapters.__getitem__, None, to_megatron=False))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    orphans = [m for m in modules if f"{m}.{WEIGHT}" not in base_keys]
    if orphans:
        raise ConversionError(f"LoRA adapters beside modules the release does not have: "
                              f"{orphans}")
    lora = cfg.lora
    LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
               target_modules=modules, bias="none", task_type="CAUSAL_LM") \
        .save_pretrained(str(out))
    # clone: A is written once per fused module, and safetensors refuses shared storage
    save_file({PEFT_PREFIX + k: v.clone().contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return modules
