"""HF <-> Megatron conversion of the Phi-2 / StableLM-2 language models."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from medmoe_mcore import checkpointing
from medmoe_mcore.runtime import parallel
from medmoe_mcore import hf as hf_classes
from medmoe_mcore.config import ModelConfig, ParallelConfig
from medmoe_mcore.conversion.engine import ConversionError, convert, plan
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.conversion.hf_config import (
    family_of_hf,
    hf_config_from_language,
    is_moe,
    language_config_from_hf,
    moe_config_from_hf,
)
from medmoe_mcore.conversion.safetensors_io import AtomicDir, SafetensorsDir, write_sharded
from medmoe_mcore.models.transformer_config import DTYPES
from medmoe_mcore.models.language import LanguageModel
from medmoe_mcore.models.specs.language import LOCAL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The HF config as a dict, normalised by transformers (legacy rope keys and all)."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    raw = json.loads(path.read_text())
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


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without Megatron's (empty) `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


def _storage_dtype(src: SafetensorsDir) -> str:
    dtypes = src.dtypes()
    kinds = sorted({str(d) for d in dtypes.values()})
    if len(kinds) != 1 or next(iter(dtypes.values())) not in _DTYPE_NAMES:
        by = {}
        for key, d in dtypes.items():
            by.setdefault(str(d), key)
        raise ConversionError(f"{src.folder}: tensors of several or unsupported dtypes "
                              f"{by} (pass --params-dtype to cast)")
    return _DTYPE_NAMES[next(iter(dtypes.values()))]


def _progress(total, desc, enabled=True):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def import_hf(hf_dir, save_root, params_dtype: str | None = None, show_progress=True) -> Path:
    """HF Phi/StableLM folder -> Megatron dist checkpoint (loadable at any TP)."""
    hf_cfg = read_hf_config(hf_dir)
    lm = language_config_from_hf(hf_cfg)
    moe = moe_config_from_hf(hf_cfg)
    src = SafetensorsDir(hf_dir)
    cast = DTYPES[params_dtype] if params_dtype else None
    cfg = ModelConfig(language=lm, moe=moe,
                      params_dtype=params_dtype or _storage_dtype(src)).validate()
    parallel.initialize(cfg.parallel)
    # Parameters are left uninitialised (never touched), then swapped for converted tensors.
    model = LanguageModel(cfg, backend=LOCAL, perform_initialization=False)
    groups = plan(weight_table(cfg), src.keys(), _weights(model).keys(), to_megatron=True)
    fill_parameters(model, convert(groups, src.get, lm, to_megatron=True), cast,
                    _progress(len(groups), "HF -> Megatron", show_progress))
    with tempfile.TemporaryDirectory() as tok:
        copied = [n for n in TOKENIZER_FILES if (Path(hf_dir) / n).exists()]
        for name in copied:
            shutil.copy(Path(hf_dir) / name, Path(tok) / name)
        return checkpointing.save(
            model.sharded_state_dict(), save_root, cfg,
            extra_files={checkpointing.HF_CONFIG: json.dumps(hf_cfg, indent=2)},
            extra_dirs={checkpointing.TOKENIZER: tok} if copied else None)


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


def weight_table(cfg: ModelConfig):
    family = FAMILIES[cfg.language.family]
    return family.moe_weights if cfg.moe is not None else family.weights


def expected_hf_keys(hf_cfg: dict) -> set[str]:
    """State-dict keys of the HF model, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config = hf_config_object(hf_cfg)
    with torch.device("meta"):
        if hf_cfg["model_type"] in hf_classes.MOE_CLASSES:
            model = hf_classes.model_class(hf_cfg["model_type"])(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


def export_hf(load_root, hf_dir, overwrite=False, show_progress=True,
              max_shard_bytes: int = 2 << 30) -> Path:
    """Megatron dist checkpoint -> HF folder (safetensors + config.json [+ tokenizer]; MoE
    checkpoints also get the `transformers` code named in the config's auto_map)."""
    folder = checkpointing.resolve(load_root)
    cfg = checkpointing.read_config(folder, ParallelConfig())
    lm = cfg.language
    base = folder / checkpointing.HF_CONFIG
    hf_cfg = hf_config_from_language(lm, json.loads(base.read_text()) if base.exists() else None,
                                     cfg.moe)
    hf_cfg["torch_dtype"] = cfg.params_dtype
    parallel.initialize(cfg.parallel)
    model = LanguageModel(cfg, backend=LOCAL, perform_initialization=False)
    checkpointing.load_into(model, folder)
    state = _weights(model)
    groups = plan(weight_table(cfg), state.keys(), expected_hf_keys(hf_cfg), to_megatron=False)
    with AtomicDir(hf_dir, overwrite=overwrite) as out:
        bar = _progress(sum(len(g.targets) for g in groups), "Megatron -> HF", show_progress)
        write_sharded(convert(groups, state.__getitem__, lm, to_megatron=False), out,
                      max_shard_bytes=max_shard_bytes, progress=lambda _: bar.update())
        bar.close()
        hf_config_object(hf_cfg).save_pretrained(str(out))
        if cfg.moe is not None:
            for path in hf_classes.REMOTE_CODE_FILES:
                shutil.copy(path, out / path.name)
        tok = folder / checkpointing.TOKENIZER
        if tok.is_dir():
            for item in tok.iterdir():
                shutil.copy(item, out / item.name)
    return Path(hf_dir)

