"""HF config <-> LanguageConfig, driven by each family's `config_keys` table."""

from __future__ import annotations

import copy
from typing import Any

from medmoe_mcore.config import ConfigError, LanguageConfig
from medmoe_mcore.conversion.families import BY_HF_MODEL_TYPE, FAMILIES, Family

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


def language_config_from_hf(hf: dict) -> LanguageConfig:
    """`hf` is an HF config as a dict (`PretrainedConfig.to_dict()`)."""
    family = family_of_hf(hf)
    for key, (value, why) in family.requires.items():
        got = _get(hf, key)
        if got is not _MISSING and got != value:
            raise ConfigError(f"config.json {key}={got!r} is not supported: {why} "
                              f"(expected {value!r})")
    fields: dict[str, Any] = dict(family.block)
    for hf_key, field_name in family.config_keys:
        value = _get(hf, hf_key)
        if hf_key == "num_key_value_heads" and value in (None, _MISSING):
            value = _get(hf, "num_attention_heads")
        if value is _MISSING:
            raise ConfigError(f"config.json has no {hf_key!r} (needed for {field_name})")
        fields[field_name] = value
    fields["rotary_base"] = float(fields["rotary_base"])
    lm = LanguageConfig(**fields)
    lm.validate()
    return lm


def hf_config_from_language(lm: LanguageConfig, base: dict | None = None) -> dict:
    """HF config dict for `lm`; `base` (the imported model's own config) keeps every other key."""
    family = FAMILIES[lm.family]
    mismatched = [f"{k}={getattr(lm, k)!r} (family {family.name} needs {v!r})"
                  for k, v in family.block.items() if getattr(lm, k) != v]
    if mismatched:
        raise ConfigError("cannot export as HF " + family.hf_architecture + ": "
                          + ", ".join(mismatched))
    hf = copy.deepcopy(base) if base else {}
    hf["model_type"] = family.hf_model_type
    hf["architectures"] = [family.hf_architecture]
    for key, (value, _) in family.requires.items():
        _set(hf, key, value)
    for hf_key, field_name in family.config_keys:
        _set(hf, hf_key, getattr(lm, field_name))
    return hf
