"""Modality router files: safetensors with `weight` [E, hidden], `bias` [E] (float32) and the
metadata key `modalities`, a JSON list of names where index i is expert i; and, for a router
whose experts are not one per modality (router/domains.py), `domains`: a JSON object,
modality -> the experts its samples were trained to reach."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medmoe_mcore.config.fields import ConfigError

KEYS = ("weight", "bias")


@dataclass(frozen=True)
class RouterWeights:
    weight: torch.Tensor
    bias: torch.Tensor
    modalities: list
    domains: dict | None = None  # None: expert i is modality `modalities[i]`

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
    domains = router.domains
    if domains is not None:
        ok = isinstance(domains, dict) and all(
            isinstance(m, str) and m and isinstance(e, list) and e
            and all(isinstance(i, int) and 0 <= i < w.shape[0] for i in e)
            for m, e in domains.items())
        covered = {i for e in domains.values() for i in e} if ok else set()
        if not ok or covered != set(range(w.shape[0])):
            raise ConfigError(f"{source}: domains {domains!r} must map modality names to "
                              f"lists of expert indices in [0, {w.shape[0]}) covering every "
                              "expert")
    return router


def save(router: RouterWeights, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, then rename)."""
    check(router, str(path))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"modalities": json.dumps(list(router.modalities))}
    if router.domains is not None:
        metadata["domains"] = json.dumps(router.domains)
    save_file({"weight": router.weight.float().contiguous(),
               "bias": router.bias.float().contiguous()}, str(tmp), metadata=metadata)
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
        try:
            router = RouterWeights(f.get_tensor("weight").float(), f.get_tensor("bias").float(),
                                   json.loads(meta["modalities"]),
                                   json.loads(meta["domains"]) if "domains" in meta else None)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: router metadata is not JSON: {e}") from None
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
