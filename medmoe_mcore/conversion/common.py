"""Helpers every conversion shares: HF config reading, the weight table of a config, the
model to convert into, parameter filling, storage dtype, tokenizer files, progress bars.

Conversions build models at TP=1/EP=1 in one process (the result loads at any TP/EP); the
process groups are the entry point's to create (`runtime.parallel.initialize`), never ours.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from medmoe_mcore import hf as hf_classes
from medmoe_mcore.config import ConfigError, ModelConfig
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.hf_config import family_of_hf, is_moe
from medmoe_mcore.conversion.safetensors_io import SafetensorsDir
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.backends import LOCAL
from medmoe_mcore.models.transformer_config import DTYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def raw_config(hf_dir) -> dict:
    """config.json of an HF folder, as written."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The HF config as a dict, normalised by transformers (legacy rope keys and all)."""
    from transformers import AutoConfig

    raw = raw_config(hf_dir)
    family_of_hf(raw)  # a clear error before transformers' own
    if is_moe(raw):  # our classes, never the folder's code
        return hf_config_object(raw).to_dict()
    return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True).to_dict()


def hf_config_object(hf_cfg: dict):
    """The `transformers` config object of a config dict (Med-MoE types: our classes)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in hf_cfg.items() if k != "model_type"}
    if hf_cfg["model_type"] in hf_classes.MOE_CLASSES:
        return hf_classes.config_class(hf_cfg["model_type"])(**fields)
    return AutoConfig.for_model(hf_cfg["model_type"], **fields)


def weight_table(cfg: ModelConfig):
    """The language model's mapping table (dense or Med-MoE) of `cfg`'s family."""
    family = FAMILIES[cfg.language.family]
    return family.moe_weights if cfg.moe is not None else family.weights


def conversion_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model a conversion fills: local backend, parameters left uninitialised (every one
    is swapped for a converted tensor), in the process groups the entry point made at TP=1."""
    if not parallel_state.model_parallel_is_initialized():
        raise ConfigError("conversion needs Megatron's process groups: initialise them first "
                          "(runtime.parallel.initialize(ParallelConfig()))")
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size())
    if layout != (1, 1):
        raise ConfigError(f"conversion runs at TP=1/EP=1 (the result loads at any layout); "
                          f"the process groups have TP={layout[0]}, EP={layout[1]}")
    return build_model(cfg, backend=LOCAL, perform_initialization=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without Megatron's (empty) `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


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


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of `src` (an HF folder or a checkpoint's tokenizer/) into
    `dst`; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy(src / name, dst / name)
    return copied
