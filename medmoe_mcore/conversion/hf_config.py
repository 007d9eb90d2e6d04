"""HF config <-> LanguageConfig, driven by each family's `config_keys` table."""

from __future__ import annotations

import copy
from typing import Any

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import LanguageConfig, MoEConfig
from medmoe_mcore.conversion.tables.language import BY_HF_MODEL_TYPE, FAMILIES, Family

_MISSING = object()


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def family_of_hf(hf: dict) -> Family:
    model_type = hf.get("model_type")
    if model_type not in BY_HF_MODEL_TYPE:
        raise ConfigError(f"config.json model_type={model_type!r}: supported are "
                          f"{sorted(BY_HF_MODEL_TYPE)}")
    return BY_HF_MODEL_TYPE[model_type]


def is_moe(hf: dict) -> bool:
    return hf.get("model_type") == family_of_hf(hf).hf_moe_model_type


def is_medmoe_type(hf: dict) -> bool:
    """One of the authors' model types (read with our classes, `lm_head_bias` explicit)."""
    family = family_of_hf(hf)
    return hf.get("model_type") in (family.hf_moe_model_type, family.hf_llava_model_type)


def with_modern_keys(hf: dict) -> dict:
    """`hf` with each legacy top-level key (the authors' transformers-4.37 names: Phi's
    partial_rotary_factor / rope_theta, StableLM's rope_pct / rope_theta / norm_eps) moved
    to its transformers 5 key; a legacy key that disagrees with its modern one is refused."""
    family = family_of_hf(hf)
    out = copy.deepcopy(hf)
    for legacy, modern in family.legacy_config_keys:
        if legacy not in out:
            continue
        value, current = out.pop(legacy), _get(out, modern)
        if current is not _MISSING and current is not None and current != value:
            raise ConfigError(f"config.json {legacy}={value!r} disagrees with {modern}="
                              f"{current!r}")
        _set(out, modern, value)
    return out


def with_legacy_keys(hf: dict) -> dict:
    """`hf` plus the legacy top-level keys the authors' code reads, from the modern ones."""
    out = copy.deepcopy(hf)
    for legacy, modern in family_of_hf(hf).legacy_config_keys:
        value = _get(out, modern)
        if value is not _MISSING:
            out[legacy] = value
    return out


def _config_keys(family: Family, moe: bool) -> tuple[tuple[str, str], ...]:
    return family.config_keys + (family.moe_config_keys if moe else ())


def language_config_from_hf(hf: dict) -> LanguageConfig:
    """`hf` is an HF config as a dict (`PretrainedConfig.to_dict()`)."""
    family = family_of_hf(hf)
    for key, (value, why) in family.requires.items():
        got = _get(hf, key)
        if got is not _MISSING and got != value:
            raise ConfigError(f"config.json {key}={got!r} is not supported: {why} "
                              f"(expected {value!r})")
    fields: dict[str, Any] = dict(family.block)
    for hf_key, field_name in _config_keys(family, is_medmoe_type(hf)):
        value = _get(hf, hf_key)
        if hf_key == "num_key_value_heads" and value in (None, _MISSING):
            value = _get(hf, "num_attention_heads")
        if hf_key == "lm_head_bias" and value is _MISSING:
            value = False  # the authors' classes have no LM-head bias
        if value is _MISSING:
            raise ConfigError(f"config.json has no {hf_key!r} (needed for {field_name})")
        fields[field_name] = value
    fields["rotary_base"] = float(fields["rotary_base"])
    lm = LanguageConfig(**fields)
    lm.validate()
    return lm


def hf_config_from_language(lm: LanguageConfig, base: dict | None = None,
                            moe: MoEConfig | None = None, multimodal: bool = False) -> dict:
    """HF config dict for `lm` (+ `moe`); `base` (the imported model's own config) keeps every
    other key. Med-MoE and multimodal models take the authors' model types and our classes
    (`auto_map`); every config carries the legacy keys the authors' code reads."""
    family = FAMILIES[lm.family]
    keys = _config_keys(family, moe is not None or multimodal)
    carried = {field_name for _, field_name in keys}
    model_type, architecture = (
        (family.hf_moe_model_type, family.hf_moe_architecture) if moe else
        (family.hf_llava_model_type, family.hf_llava_architecture) if multimodal else
        (family.hf_model_type, family.hf_architecture))
    mismatched = [f"{k}={getattr(lm, k)!r} (family {family.name} needs {v!r})"
                  for k, v in family.block.items() if k not in carried and getattr(lm, k) != v]
    if mismatched:
        raise ConfigError(f"cannot export as HF {architecture}: " + ", ".join(mismatched))
    hf = with_modern_keys(base) if base else {}
    base_moe = hf.pop("moe", None) or {}
    for stale in ("auto_map", "lm_head_bias"):
        hf.pop(stale, None)
    hf["model_type"] = model_type
    hf["architectures"] = [architecture]
    for key, (value, _) in family.requires.items():
        _set(hf, key, value)
    for hf_key, field_name in keys:
        _set(hf, hf_key, getattr(lm, field_name))
    if moe is not None:  # the imported dict's inert keys (their capacity settings) are kept
        hf["moe"] = {**MOE_EXPORT_CONSTANTS, **base_moe, **moe_to_hf(moe, lm)}
    if moe is not None or multimodal:
        from medmoe_mcore.hf import auto_map

        hf["auto_map"] = auto_map(hf["model_type"])
    return with_legacy_keys(hf)


# (key of the HF `moe` dict, MoEConfig field, value when an authors' config lacks the key):
# the routing choices, written and read by one table. Their keys are MoE-LLaVA's; ours follow.
MOE_CONFIG_KEYS = (
    ("top_k_experts", "router_topk", _MISSING),
    ("router_type", "router_type", "modality"),
    ("routing_granularity", "routing_granularity", "token"),
    ("renormalize", "renormalize", None),  # absent: the authors' rule (top-2 yes, top-1 no)
    ("meta_expert", "meta_expert", True),
    ("token_dispatcher", "token_dispatcher", "alltoall"),
    ("modalities", "modalities", None),
)
# Keys of the authors' dict that their code does not compute with (capacity is hard-coded
# there, tokens never dropped), written when no imported config had them.
MOE_EXPORT_CONSTANTS = dict(moe_enable=True, ep_size=1, capacity_factor=0.0,
                            eval_capacity_factor=0.0, min_capacity=0, use_residual=False,
                            train_modules=[], router_aux_loss_coef=0.0)


def moe_to_hf(moe: MoEConfig, lm: LanguageConfig) -> dict:
    """The authors' `moe` dict (MoE-LLaVA keys) plus the choices they did not have."""
    layers = [i for i, on in enumerate(moe.moe_layers(lm.num_layers)) if on]
    return {
        "moe_mode": "sparse" if moe.layer_freq == 2 else "custom",
        "moe_layers_idx": layers,
        "num_experts": [moe.num_experts] * len(layers),
        # Their configs carry 0.01 with the fixed router too, where nothing reads it.
        **({"router_aux_loss_coef": moe.aux_loss_coeff} if moe.router_type == "learned"
           else {}),
        "router_bias": moe.router_type == "modality" or lm.add_bias_linear,
        **{key: getattr(moe, name) for key, name, _ in MOE_CONFIG_KEYS},
    }


def moe_config_from_hf(hf: dict) -> MoEConfig | None:
    """MoEConfig of an MoE HF config (ours or the authors'), None for a dense one."""
    if not is_moe(hf):
        return None
    d = hf.get("moe")
    if not isinstance(d, dict) or "moe_layers_idx" not in d or "num_experts" not in d:
        raise ConfigError(f"config.json model_type={hf['model_type']!r} needs a 'moe' dict with "
                          "'moe_layers_idx' and 'num_experts'")
    layers, n = list(d["moe_layers_idx"]), hf["num_hidden_layers"]
    counts = d["num_experts"] if isinstance(d["num_experts"], list) else [d["num_experts"]]
    if len(set(counts)) != 1:
        raise ConfigError(f"config.json moe.num_experts={counts}: one expert count for every "
                          "MoE layer is supported")
    known = {key for key, _, _ in MOE_CONFIG_KEYS} | set(MOE_EXPORT_CONSTANTS) | {
        "moe_mode", "moe_layers_idx", "num_experts", "router_bias"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"config.json moe keys {unknown} are not understood by this "
                          "converter; refusing to guess their meaning")
    if d.get("use_residual"):
        raise ConfigError("config.json moe.use_residual=True (Residual-MoE) is not supported")
    fields = {}
    for key, name, default in MOE_CONFIG_KEYS:
        fields[name] = d.get(key, default)
        if fields[name] is _MISSING:
            raise ConfigError(f"config.json moe has no {key!r} (needed for moe.{name})")
    if fields["renormalize"] is None:
        fields["renormalize"] = fields["router_topk"] >= 2
    learned = fields["router_type"] == "learned"
    return MoEConfig(
        num_experts=counts[0],
        layer_freq=2 if layers == list(range(0, n, 2)) else [int(i in layers) for i in range(n)],
        # The authors' configs carry 0.01 even with their fixed router, which has no aux loss.
        aux_loss_coeff=d.get("router_aux_loss_coef", 0.0) if learned else 0.0,
        **fields,
    )
