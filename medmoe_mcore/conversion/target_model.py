"""The Megatron model a conversion fills: the config's weight table, the model built at
TP=1/EP=1 with parameters left uninitialised, its weights, the storage dtype of the source and
the swap of converted tensors into the parameters.

Conversions build models at TP=1/EP=1 in one process (the result loads at any TP/EP); the
process groups are the entry point's to create (`runtime.parallel.initialize`), never ours.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.safetensors_io import SafetensorsDir
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.backends import LOCAL
from medmoe_mcore.models.transformer_config import DTYPES

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def weight_table(cfg: ModelConfig):
    """The language model's mapping table (dense or Med-MoE) of `cfg`'s family."""
    family = FAMILIES[cfg.language.family]
    return family.moe_weights if cfg.moe is not None else family.weights


class _OnMeta(TorchFunctionMode):
    """Every tensor created on the meta device, whatever device Megatron asks for: a model's
    shapes and size without a byte allocated."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def conversion_model(cfg: ModelConfig, meta: bool = False) -> torch.nn.Module:
    """The model a conversion fills: local backend, parameters left uninitialised (every one
    is swapped for a converted tensor), in the process groups the entry point made at TP=1.
    `meta`: on the meta device (shapes only), for the checks made before allocating."""
    if not parallel_state.model_parallel_is_initialized():
        raise ConfigError("conversion needs Megatron's process groups: initialise them first "
                          "(runtime.parallel.initialize(ParallelConfig()))")
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size())
    if layout != (1, 1):
        raise ConfigError(f"conversion runs at TP=1/EP=1 (the result loads at any layout); "
                          f"the process groups have TP={layout[0]}, EP={layout[1]}")
    if meta:
        with torch.device("meta"), _OnMeta():
            return build_model(cfg, backend=LOCAL, perform_initialization=False)
    return build_model(cfg, backend=LOCAL, perform_initialization=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without Megatron's (empty) `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


def without_zero_head_bias(cfg: ModelConfig, state: dict) -> ModelConfig:
    """Every export's LM head: an all-zero bias (Megatron's initial value, never trained) is
    left out of `state` and the config says `lm_head_bias: false`. The logits are the same, and
    the authors' classes, which have no LM-head bias, then read the folder exactly; a trained
    (non-zero) bias is kept."""
    keys = [k for k in state if k.endswith("output_layer.bias")]
    if not cfg.language.output_layer_bias or len(keys) != 1 or state[keys[0]].any():
        return cfg
    del state[keys[0]]
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language,
                                                                 output_layer_bias=False))


def storage_dtype(src: SafetensorsDir) -> str:
    """The one dtype of a folder's tensors; refuses a mix (name one tensor of each)."""
    dtypes = src.dtypes()
    kinds = sorted({str(d) for d in dtypes.values()})
    if len(kinds) != 1 or next(iter(dtypes.values())) not in DTYPE_NAMES:
        by = {}
        for key, d in dtypes.items():
            by.setdefault(str(d), key)
        raise ConversionError(f"{src.folder}: tensors of several or unsupported dtypes "
                              f"{by} (pass --params-dtype to cast)")
    return DTYPE_NAMES[next(iter(dtypes.values()))]


def progress(total, desc, enabled=True):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def fill_parameters(model, tensors, cast, bar) -> None:
    """Swap each (key, tensor) into the model's parameter of that name, shapes checked."""
    params = dict(model.named_parameters())
    for key, tensor in tensors:
        param = params[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConversionError(f"{key}: converted shape {tuple(tensor.shape)} != model shape "
                                  f"{tuple(param.shape)}")
        param.data = tensor.to(cast) if cast is not None else tensor
        bar.update()
    bar.close()
