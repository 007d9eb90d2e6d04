"""Modality router files: safetensors with `weight` [E, hidden], `bias` [E] (float32) and the
metadata key `modalities`, a JSON list of names where index i is expert i."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medmoe_mcore.config import ConfigError

KEYS = ("weight", "bias")


@dataclass(frozen=True)
class RouterWeights:
    weight: torch.Tensor
    bias: torch.Tensor
    modalities: list

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]


def check(router: RouterWeights, source: str, hidden_size: int | None = None,
          num_experts: int | None = None) -> RouterWeights:
    """Shape and name checks; every message names `source` and the mismatch."""
    w, b, names = router.weight, router.bias, router.modalities
    if w.dim() != 2:
        raise ConfigError(f"{source}: router weight has shape {list(w.shape)}, expected "
                          "[num_experts, hidden_size]")
    if list(b.shape) != [w.shape[0]]:
        raise ConfigError(f"{source}: router bias has shape {list(b.shape)}, expected "
                          f"[{w.shape[0]}] (one per expert)")
    if hidden_size is not None and w.shape[1] != hidden_size:
        raise ConfigError(f"{source}: router hidden size {w.shape[1]} does not match the "
                          f"model's hidden_size={hidden_size}")
    if num_experts is not None and w.shape[0] != num_experts:
        raise ConfigError(f"{source}: router has {w.shape[0]} experts (rows) but "
                          f"num_experts={num_experts}")
    if len(names) != w.shape[0] or len(set(names)) != len(names) \
            or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{source}: modalities {names!r} must be {w.shape[0]} distinct "
                          "non-empty names, one per expert")
    return router


def save(router: RouterWeights, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, then rename)."""
    check(router, str(path))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"weight": router.weight.float().contiguous(),
               "bias": router.bias.float().contiguous()}, str(tmp),
              metadata={"modalities": json.dumps(list(router.modalities))})
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, hidden_size: int | None = None,
         num_experts: int | None = None) -> RouterWeights:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"router file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(KEYS):
            raise ConfigError(f"{path}: router file tensors {sorted(keys)}, expected "
                              f"{list(KEYS)} (missing {sorted(set(KEYS) - keys)}, unknown "
                              f"{sorted(keys - set(KEYS))})")
        meta = f.metadata() or {}
        if "modalities" not in meta:
            raise ConfigError(f"{path}: no 'modalities' metadata (the expert order)")
        router = RouterWeights(f.get_tensor("weight").float(), f.get_tensor("bias").float(),
                               json.loads(meta["modalities"]))
    return check(router, str(path), hidden_size, num_experts)


def from_authors_pth(path: str | os.PathLike, modalities: list) -> RouterWeights:
    """The Med-MoE authors' released routers (`fc1.weight`, `fc1.bias` pickles). They never
    recorded the modality order, so `modalities` (index = expert) comes from the user."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    expected = {"fc1.weight", "fc1.bias"}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: expected keys {sorted(expected)}, found {got}")
    return check(RouterWeights(state["fc1.weight"].float(), state["fc1.bias"].float(),
                               list(modalities)), str(path))
