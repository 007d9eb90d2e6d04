"""Checks made before a conversion allocates a model from a config it did not write.

A config.json is a claim; the safetensors headers (already checked by the format's rules) say
what is really there. Before any parameter exists: the layer and expert counts the config
declares are compared with those the tensor names hold (a model of 10^7 layers is never
built), the model is built on the meta device and every converted tensor's shape, computed on
the meta device from the headers' shapes, is compared with its parameter (a hidden size of 10^9
is named, never allocated), and the model's size is compared with the memory this process can
still allocate. Each refusal names the config key(s) at fault.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch

from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conversion.engine import ConversionError, convert, plan
from medmoe_mcore.conversion.mappings import Mapping
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.conversion.tables.vision import CLIP_CONFIG_KEYS
from medmoe_mcore.conversion.target_model import conversion_model, weights
from medmoe_mcore.models.moe import names
from medmoe_mcore.models.transformer_config import DTYPES
from medmoe_mcore.runtime.memory import available_bytes, human

_LAYER = re.compile(r"(?P<prefix>.*?)layers\.(?P<i>\d+)\.")
_EXPERT = re.compile(re.escape(names.EXPERT).replace(r"\{j\}", r"(?P<j>\d+)"))


def _sizes(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(what a user reads in their config, value) of every integer size of `cfg`."""
    out = []
    keys = dict((f, k) for k, f in FAMILIES[cfg.language.family].config_keys)
    for field, value in vars(cfg.language).items():
        if isinstance(value, int) and not isinstance(value, bool) and field in keys:
            out.append((f"config.json {keys[field]}={value} (language.{field})", value))
    if cfg.vision is not None:
        keys = dict((f, k) for k, f in CLIP_CONFIG_KEYS)
        for field, value in vars(cfg.vision).items():
            if isinstance(value, int) and not isinstance(value, bool) and field in keys:
                out.append((f"vision config {keys[field]}={value} (vision.{field})", value))
    if cfg.lora is not None:
        out.append((f"adapter_config.json r={cfg.lora.rank} (lora.rank)", cfg.lora.rank))
    return out


def _blame(cfg: ModelConfig, expected: Sequence[int], found: Sequence[int] = (),
           text: str = "") -> str:
    """The config sizes that appear in `expected` but not in `found`, or in a message."""
    words = set(re.findall(r"\d+", text))
    culprits = [name for name, value in _sizes(cfg)
                if (value in expected and value not in found) or str(value) in words]
    return "; check " + ", ".join(culprits) if culprits else ""


def _count_check(cfg: ModelConfig, targets: Iterable[str], where: str) -> None:
    """Layer and expert counts the config declares vs those the tensor names hold."""
    layers, experts = defaultdict(set), set()
    for key in targets:
        if (m := _LAYER.match(key)) is not None:
            layers[m["prefix"]].add(int(m["i"]))
        if (m := _EXPERT.search(key)) is not None:
            experts.add(int(m["j"]))
    declared = []
    for prefix, found in layers.items():
        if prefix.startswith("vision."):
            declared.append((cfg.vision.num_layers, found, "vision config num_hidden_layers / "
                             f"the feature layer (vision.num_layers={cfg.vision.num_layers})"))
        else:
            declared.append((cfg.language.num_layers, found, "config.json num_hidden_layers="
                             f"{cfg.language.num_layers}"))
    if cfg.moe is not None and experts:
        declared.append((cfg.moe.num_experts, experts,
                         f"config.json moe.num_experts={cfg.moe.num_experts}"))
    for want, found, what in declared:
        if want != len(found):
            raise ConversionError(f"{where}: {what} disagrees with the weights, which hold "
                                  f"{len(found)} (indices {min(found)}-{max(found)})")


def _shape_check(cfg: ModelConfig, groups, meta_get: Callable[[str], torch.Tensor],
                 expected: dict[str, torch.Tensor], where: str) -> None:
    """Every converted tensor's shape, computed on the meta device, equals its parameter's."""
    for group in groups:
        try:
            produced = list(convert([group], meta_get, cfg.language, to_megatron=True))
        except (RuntimeError, ValueError) as e:
            shapes = ", ".join(f"{k} {tuple(meta_get(k).shape)}" for k in group.sources)
            raise ConversionError(f"{where}: {shapes} cannot be converted with this config "
                                  f"({str(e)[:200]}){_blame(cfg, (), text=str(e))}") from None
        for key, tensor in produced:
            want, got = tuple(expected[key].shape), tuple(tensor.shape)
            if want != got:
                sources = ", ".join(f"{k} {tuple(meta_get(k).shape)}" for k in group.sources)
                raise ConversionError(
                    f"{where}: the config's sizes disagree with the weights: {sources} give "
                    f"{key} the shape {got}, the config makes it {want}"
                    f"{_blame(cfg, want, got)}")


def require_fits(need: int, where: str, what: str) -> None:
    """Refuse, before allocating, `need` bytes this process cannot allocate."""
    avail = available_bytes()
    if avail is not None and need > avail:
        raise ConversionError(f"{where}: {what} needs {human(need)}, this process can allocate "
                              f"{human(avail)}")


def _fit_check(cfg: ModelConfig, model: dict[str, torch.Tensor], where: str) -> None:
    key, biggest = max(model.items(), key=lambda kv: kv[1].numel())
    need = sum(t.numel() for t in model.values()) * DTYPES[cfg.params_dtype].itemsize
    require_fits(need, where, f"the model this config describes ({cfg.params_dtype} "
                 f"parameters, largest {key} {tuple(biggest.shape)}"
                 f"{_blame(cfg, tuple(biggest.shape))})")


def checked_plan(cfg: ModelConfig, table: Sequence[Mapping], keys: Iterable[str],
                 meta_get: Callable[[str], torch.Tensor], where: str,
                 keep: Callable[[str], bool] | None = None):
    """The conversion plan of source `keys` into `cfg`'s model (HF -> Megatron), once the
    config is proven consistent with the sources' shapes and the machine's memory; `keep`
    selects the parameters the sources must provide (default: all). Nothing is allocated."""
    keys = list(keys)
    _count_check(cfg, (t for g in plan(table, keys, None, to_megatron=True) for t in g.targets),
                 where)
    model = weights(conversion_model(cfg, meta=True))
    expected = {k: v for k, v in model.items() if keep is None or keep(k)}
    groups = plan(table, keys, expected.keys(), to_megatron=True)
    _shape_check(cfg, groups, meta_get, expected, where)
    _fit_check(cfg, model, where)
    return groups
