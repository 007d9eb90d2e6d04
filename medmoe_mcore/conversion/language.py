"""HF <-> Megatron conversion of the Phi-2 / StableLM-2 language models."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from medmoe_mcore import hf as hf_classes
from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.conversion.engine import convert, plan
from medmoe_mcore.conversion.hf_config import (hf_config_from_language, language_config_from_hf,
                                               moe_config_from_hf)
from medmoe_mcore.conversion.hf_files import (check_tokenizer, copy_tokenizer, hf_config_object,
                                              read_hf_config, write_config)
from medmoe_mcore.conversion.preflight import checked_plan
from medmoe_mcore.conversion import hf_folder
from medmoe_mcore.conversion.hf_folder import open_weights
from medmoe_mcore.conversion.safetensors_io import AtomicDir, write_sharded
from medmoe_mcore.conversion.target_model import (conversion_model, fill_parameters, progress,
                                                  storage_dtype, weight_table, weights,
                                                  without_zero_head_bias)
from medmoe_mcore.models.transformer_config import DTYPES


def import_hf(hf_dir, save_root, params_dtype: str | None = None, show_progress=True,
              overwrite: bool = False, tokenizer: bool = True) -> Path:
    """HF Phi/StableLM folder -> Megatron dist checkpoint (loadable at any TP); a `save_root`
    holding a checkpoint is refused before any work unless `overwrite`. `tokenizer`: the
    folder's tokenizer is checked and carried (else none is)."""
    store.check_can_release(save_root, overwrite)
    hf_dir = hf_folder.resolve(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    lm = language_config_from_hf(hf_cfg)
    moe = moe_config_from_hf(hf_cfg)
    if tokenizer:
        check_tokenizer(hf_dir, lm.vocab_size)
    src = open_weights(hf_dir)
    cast = DTYPES[params_dtype] if params_dtype else None
    cfg = ModelConfig(language=lm, moe=moe,
                      params_dtype=params_dtype or storage_dtype(src)).validate()
    groups = checked_plan(cfg, weight_table(cfg), src.keys(), src.meta, str(hf_dir))
    model = conversion_model(cfg)
    fill_parameters(model, convert(groups, src.get, lm, to_megatron=True), cast,
                    progress(len(groups), "HF -> Megatron", show_progress))
    with tempfile.TemporaryDirectory() as tok:
        copied = copy_tokenizer(hf_dir, tok) if tokenizer else []
        return store.save(
            model.sharded_state_dict(), save_root, cfg,
            extra_files={store.HF_CONFIG: json.dumps(hf_cfg, indent=2)},
            extra_dirs={store.TOKENIZER: tok} if copied else None, overwrite=overwrite)


def expected_hf_keys(hf_cfg: dict) -> set[str]:
    """State-dict keys of the HF model, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config = hf_config_object(hf_cfg)
    with torch.device("meta"):
        if hf_cfg["model_type"] in hf_classes.CLASSES:
            model = hf_classes.model_class(hf_cfg["model_type"])(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


def export_hf(load_root, hf_dir, overwrite=False, show_progress=True,
              max_shard_bytes: int = 2 << 30) -> Path:
    """Megatron dist checkpoint -> HF folder (safetensors + config.json [+ tokenizer]; MoE
    checkpoints also get the `transformers` code named in the config's auto_map)."""
    folder = store.resolve(load_root)
    cfg = store.read_config(folder, ParallelConfig())
    model = conversion_model(cfg)
    store.load_into(model, folder)
    state = weights(model)
    if cfg.moe is not None:  # our classes honour lm_head_bias; plain Phi always has the bias
        cfg = without_zero_head_bias(cfg, state)
    lm = cfg.language
    base = folder / store.HF_CONFIG
    hf_cfg = hf_config_from_language(lm, json.loads(base.read_text()) if base.exists() else None,
                                     cfg.moe)
    hf_cfg["torch_dtype"] = cfg.params_dtype
    groups = plan(weight_table(cfg), state.keys(), expected_hf_keys(hf_cfg), to_megatron=False)
    with AtomicDir(hf_dir, overwrite=overwrite) as out:
        bar = progress(sum(len(g.targets) for g in groups), "Megatron -> HF", show_progress)
        write_sharded(convert(groups, state.__getitem__, lm, to_megatron=False), out,
                      max_shard_bytes=max_shard_bytes, progress=lambda _: bar.update())
        bar.close()
        write_config(out, hf_cfg)
        if cfg.moe is not None:
            for path in hf_classes.REMOTE_CODE_FILES:
                shutil.copy(path, out / path.name)
        copy_tokenizer(folder / store.TOKENIZER, out)
    return Path(hf_dir)

