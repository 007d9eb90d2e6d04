"""Dense (stage-2) checkpoint -> Med-MoE (stage-3) checkpoint.

Every expert and the meta expert of an MoE layer start as copies of that layer's dense FFN;
the modality router comes from a router file (the same weights in every MoE layer), or, for
the learned-router baseline, is initialised as Megatron does. Everything else is copied by name.
Runs at TP1/EP1 in one process; the result loads at any TP/EP.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from medmoe_mcore import checkpointing
from medmoe_mcore.runtime import parallel
from medmoe_mcore.router import file as router_file
from medmoe_mcore.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.language import LOCAL

# decoder.layers.{i}.mlp.(experts.local_experts.{j}. | shared_experts.)rest <- ...mlp.rest
_EXPERT = re.compile(r"((?:language_model\.)?decoder\.layers\.\d+\.mlp\.)(?:experts\.local_experts\.\d+\.|shared_experts\.)(.+)")
_ROUTER = re.compile(r"(?:language_model\.)?decoder\.layers\.\d+\.mlp\.router\.(weight|bias)")


def dense_source(moe_key: str) -> str:
    """The dense-checkpoint key an MoE-model parameter is copied from."""
    m = _EXPERT.fullmatch(moe_key)
    return m.group(1) + m.group(2) if m else moe_key


def upcycle(dense_root, save_root, moe: MoEConfig, router_path=None) -> Path:
    folder = checkpointing.resolve(dense_root)
    dense_cfg = checkpointing.read_config(folder, ParallelConfig())
    if dense_cfg.moe is not None:
        raise ConfigError(f"{folder} is already an MoE checkpoint")
    lm = dense_cfg.language
    router = None
    if moe.router_type == "modality":
        if router_path is None:
            raise ConfigError("router_type='modality' needs a router file (--router)")
        router = router_file.load(router_path, hidden_size=lm.hidden_size,
                                  num_experts=moe.num_experts)
        moe = dataclasses.replace(moe, modalities=list(router.modalities))
    elif router_path is not None:
        raise ConfigError("a router file was given but router_type='learned'")
    cfg = ModelConfig(language=lm, moe=moe, vision=dense_cfg.vision,
                      params_dtype=dense_cfg.params_dtype).validate()

    parallel.initialize(ParallelConfig())
    dense = build_model(dense_cfg, backend=LOCAL, perform_initialization=False)
    checkpointing.load_into(dense, folder)
    source = dense.state_dict()
    # Only the learned router keeps Megatron's initialisation; all else is overwritten.
    model = build_model(cfg, backend=LOCAL, perform_initialization=moe.router_type == "learned")
    used, missing = set(), []
    with torch.no_grad():
        for key, param in model.named_parameters():
            if (m := _ROUTER.fullmatch(key)) is not None:
                if router is not None:
                    param.copy_(getattr(router, m.group(1)))
                continue
            src = dense_source(key)
            if src not in source:
                missing.append(f"{key} (from {src})")
                continue
            param.copy_(source[src])
            used.add(src)
    unused = sorted(k for k in source if k not in used and not k.endswith("._extra_state"))
    if missing or unused:
        raise ConfigError(f"upcycling {folder}: MoE parameters without a dense source "
                          f"{missing}; dense tensors left unused {unused}")
    files, dirs = checkpointing.carried(folder)
    return checkpointing.save(model.sharded_state_dict(), save_root, cfg, extra_files=files,
                              extra_dirs=dirs)
