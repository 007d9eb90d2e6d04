"""Dense (stage-2) checkpoint -> Med-MoE (stage-3) checkpoint.

Every expert and the meta expert of an MoE layer start as copies of that layer's dense FFN;
the modality router comes from a router file (the same weights in every MoE layer), or, for
the learned-router baseline, is initialised as Megatron does. Everything else is copied by
name. The copy plan goes through the conversion engine, so an MoE parameter without a dense
source, or a dense tensor left unused, stops the upcycling with the keys listed. Runs at
TP1/EP1 in the entry point's process groups; the result loads at any TP/EP.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
from medmoe_mcore.conversion.engine import convert, plan
from medmoe_mcore.conversion.mappings import Direct, Replicate
from medmoe_mcore.conversion.preflight import require_fits
from medmoe_mcore.conversion.target_model import conversion_model, weights
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.moe import names
from medmoe_mcore.models.specs.backends import LOCAL
from medmoe_mcore.models.transformer_config import DTYPES
from medmoe_mcore.router import file as router_file

# "<prefix>decoder.layers.{i}.mlp.<rest>": a dense FFN tensor and its layer index.
_FFN = re.compile(r"(?P<prefix>(?:language_model\.)?decoder\.layers\.)(?P<i>\d+)\."
                  + re.escape(names.FFN) + r"(?P<rest>.+)")


def upcycle_table(dense_keys, moe: MoEConfig, num_layers: int):
    """One entry per dense tensor: the FFN of an MoE layer fans out to its experts and meta
    expert, everything else is copied under its own name."""
    is_moe = moe.moe_layers(num_layers)
    table = []
    for key in dense_keys:
        m = _FFN.fullmatch(key)
        if m is None or not is_moe[int(m["i"])]:
            table.append(Direct(key, key))
            continue
        layer = f"{m['prefix']}{m['i']}."
        copies = [layer + names.EXPERT.format(j=j) + m["rest"] for j in range(moe.num_experts)]
        if moe.meta_expert:
            copies.append(layer + names.META_EXPERT + m["rest"])
        table.append(Replicate(key, copies))
    return table


def _upcycling_bytes(dense_cfg: ModelConfig, moe: MoEConfig) -> int:
    """The dense model plus the MoE model it becomes, counted on the meta device (before a
    user's expert count can allocate anything)."""
    shapes = weights(conversion_model(dense_cfg, meta=True))
    is_moe = moe.moe_layers(dense_cfg.language.num_layers)
    copies = moe.num_experts + moe.meta_expert
    numel = 0
    for key, t in shapes.items():
        m = _FFN.fullmatch(key)
        numel += t.numel() * (1 + (copies if m is not None and is_moe[int(m["i"])] else 1))
    return numel * DTYPES[dense_cfg.params_dtype].itemsize


def upcycle(dense_root, save_root, moe: MoEConfig, router_path=None,
            overwrite: bool = False) -> Path:
    store.check_can_release(save_root, overwrite)
    folder = store.resolve(dense_root)
    dense_cfg = store.read_config(folder, ParallelConfig())
    if dense_cfg.moe is not None:
        raise ConfigError(f"{folder} is already an MoE checkpoint")
    if dense_cfg.lora is not None:
        raise ConfigError(f"{folder} holds LoRA adapters: merge them into the weights first "
                          "(tools/merge_lora.py), then upcycle the merged checkpoint")
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

    require_fits(_upcycling_bytes(dense_cfg, moe), str(save_root),
                 f"--num-experts {moe.num_experts}: holding the dense checkpoint and its "
                 "Med-MoE upcycling")
    dense = conversion_model(dense_cfg)
    store.load_into(dense, folder)
    source = weights(dense)
    # Only the learned router keeps Megatron's initialisation; all else is overwritten.
    model = build_model(cfg, backend=LOCAL, perform_initialization=moe.router_type == "learned")
    params = dict(model.named_parameters())
    routers = [k for k in params if (names.ROUTER in k)]
    groups = plan(upcycle_table(source, moe, lm.num_layers), source,
                  set(params) - set(routers), to_megatron=False)
    with torch.no_grad():
        for key, tensor in convert(groups, source.__getitem__, lm, to_megatron=False):
            params[key].copy_(tensor)
        if router is not None:
            for key in routers:
                params[key].copy_(getattr(router, key.rsplit(".", 1)[1]))
    files, dirs = store.carried(folder)
    return store.save(model.sharded_state_dict(), save_root, cfg, extra_files=files,
                              extra_dirs=dirs, overwrite=overwrite)
