"""LoRA adapters of a Megatron checkpoint <-> a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, PEFT's key names) for the release folder of the same checkpoint:

    base = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)

The adapter keys follow the release's own mapping table: B's rows are the base weight's rows,
so B takes the weight's row transform (fused q/k/v -> q_proj, k_proj, v_proj; gate/up ->
gate_proj, up_proj), while A, shared by the fused outputs, is written for each of them: PEFT
computes the same (alpha / r) B A per module. The config is written by `peft.LoraConfig`.

Import reads such a folder back (`tools/convert_hf_to_mcore.py --peft-adapter-dir`): what
PEFT can hold and a Megatron adapter cannot (another rank or alpha per module, rsLoRA, DoRA,
bias training, whole modules to save, q/k/v adapters with different A: not one fused
adapter) is refused naming it; merging such an adapter into the base with PEFT's
`merge_and_unload()` and importing the merged model always works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.lora import LORA_TARGETS, LoRAConfig
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conversion.engine import ConversionError, convert, plan
from medmoe_mcore.conversion.mappings import Mapping
from medmoe_mcore.conversion.safetensors_io import read_file
from medmoe_mcore.models.moe import names

PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped model
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
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
        if not tensors[0].is_meta and any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ConversionError(
                f"{self.megatron}: the adapter's {', '.join(self.hf)} have different lora_A "
                "(trained apart, e.g. by PEFT on the HF model), but Megatron's fused layer holds "
                "one adapter: merge it into the base with PEFT's merge_and_unload() and import "
                "the merged model")
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
    written = json.loads((out / ADAPTER_CONFIG).read_text())  # PEFT keeps the names as a
    written["target_modules"] = modules  # set: written in hash order; sorted, it is the same
    (out / ADAPTER_CONFIG).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    # clone: A is written once per fused module, and safetensors refuses shared storage
    save_file({PEFT_PREFIX + k: v.clone().contiguous() for k, v in tensors.items()},
              str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return modules

# (Megatron key part, LoRA target); the first that a key contains names its target
TARGET_OF_KEY = (("." + names.EXPERT.split("{j}")[0], "experts"),
                 ("." + names.META_EXPERT, "meta_expert"),
                 (".self_attention.linear_qkv.", "linear_qkv"),
                 (".self_attention.linear_proj.", "linear_proj"),
                 (".mlp.linear_fc1.", "linear_fc1"), (".mlp.linear_fc2.", "linear_fc2"))
# PEFT options a Megatron adapter cannot express: (key, the value it must have)
UNSUPPORTED = (("use_rslora", False), ("use_dora", False), ("bias", "none"),
               ("modules_to_save", None), ("fan_in_fan_out", False), ("rank_pattern", {}),
               ("alpha_pattern", {}), ("layers_to_transform", None))


def read_peft_adapter(folder: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """(the LoRA shape, targets still unset; tensors by HF key without PEFT's prefix)."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ConfigError(f"--peft-adapter-dir {folder}: no {name}")
    try:
        raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({str(e)[:200]})") \
            from None
    if not isinstance(raw, dict) or not all(k in raw for k in ("r", "lora_alpha")):
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: a JSON object with r and lora_alpha "
                          "is needed")
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: peft_type={raw.get('peft_type')!r}, "
                          "only LORA adapters import")
    bad = [f"{key}={raw[key]!r}" for key, wanted in UNSUPPORTED
           if raw.get(key) not in (wanted, None)]
    if bad:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: {', '.join(bad)}: not a Megatron "
                          "adapter (merge it with PEFT's merge_and_unload() and import the "
                          "merged model)")
    tensors = read_file(folder / ADAPTER_WEIGHTS)
    foreign = sorted(k for k in tensors if not k.startswith(PEFT_PREFIX))
    if foreign:
        raise ConversionError(f"{folder / ADAPTER_WEIGHTS}: keys outside {PEFT_PREFIX!r}: "
                              f"{foreign[:5]}")
    lora = LoRAConfig(rank=raw["r"], alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout") or 0.0))
    return lora, {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}


def targets_of(megatron_keys) -> list[str]:
    """The LoRA targets adapted in `megatron_keys` (in LoRAConfig's order)."""
    found = set()
    for key in megatron_keys:
        target = next((t for part, t in TARGET_OF_KEY if part in key), None)
        if target is None:
            raise ConversionError(f"{key}: an adapter on no LoRA target")
        found.add(target)
    return [t for t in LORA_TARGETS if t in found]
