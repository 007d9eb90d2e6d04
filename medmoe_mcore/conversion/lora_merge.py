"""A LoRA checkpoint -> the same model without adapters: W + (alpha / r) B A, in the weights'
dtype; everything else (projector, router, vision tower, carried files) as it was. The merged
checkpoint is an ordinary one: upcycling, the router step, release export and any TP/EP take it
as usual."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.conversion.target_model import conversion_model
from medmoe_mcore.models.lora.linears import merged_weights


def lora_model(folder: Path) -> tuple[object, ModelConfig]:
    """(the checkpoint's model, loaded, at TP = 1, its config); refuses one without LoRA."""
    cfg = store.read_config(folder, ParallelConfig())
    if cfg.lora is None:
        raise ConfigError(f"{folder}: the checkpoint has no LoRA adapters (nothing to merge)")
    model = conversion_model(cfg)
    store.load_into(model, folder)
    return model, cfg


def merged_model(model, cfg: ModelConfig):
    """The model without adapters whose weights are `model`'s merged ones (same TP = 1)."""
    plain_cfg = dataclasses.replace(cfg, lora=None)
    plain = conversion_model(plain_cfg)
    plain.load_state_dict(merged_weights(model), strict=True)
    return plain, plain_cfg


def merge_checkpoint(load_root: str | os.PathLike, save_root: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Collective at TP = 1 / EP = 1: write the merged checkpoint of `load_root`."""
    store.check_can_release(save_root, overwrite)
    folder = store.resolve(load_root)
    plain, plain_cfg = merged_model(*lora_model(folder))
    files, dirs = store.carried(folder)
    return store.save(plain.sharded_state_dict(), save_root, plain_cfg,
                              extra_files=files, extra_dirs=dirs, overwrite=overwrite)
