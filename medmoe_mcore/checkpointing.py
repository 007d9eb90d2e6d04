"""Megatron distributed checkpoints (torch_dist) in Megatron-LM's directory layout.

    ROOT/latest_checkpointed_iteration.txt   "release" or an iteration number
    ROOT/release/ or ROOT/iter_0000100/      dist_checkpointing shards + medmoe_config.json
                                             (+ hf_config.json, tokenizer/ when imported)

A save goes to a temporary folder that is renamed only after every rank finished, and the
tracker file moves last (atomically), so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from medmoe_mcore.config import ModelConfig, ParallelConfig

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG = "medmoe_config.json"
HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer"
PASSTHROUGH = "hf_passthrough"  # HF tensors kept aside on import (never run), for export


def tag_for(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve(root: str | os.PathLike) -> Path:
    """The checkpoint folder the tracker points to (or `root` itself if it holds a config)."""
    root = Path(root)
    if (root / CONFIG).exists():
        return root
    tracker = root / TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"{root}: no {TRACKER} and no {CONFIG}: not a checkpoint")
    text = tracker.read_text().strip()
    folder = root / (text if text == "release" else tag_for(int(text)))
    if not (folder / CONFIG).exists():
        raise FileNotFoundError(f"{tracker} points to {folder}, which has no {CONFIG}")
    return folder


def is_checkpoint(root: str | os.PathLike) -> bool:
    try:
        resolve(root)
        return True
    except FileNotFoundError:
        return False


def read_config(root: str | os.PathLike, parallel: ParallelConfig | None = None) -> ModelConfig:
    return ModelConfig.from_json((resolve(root) / CONFIG).read_text(), parallel=parallel)


def save(sharded_state_dict: dict, root: str | os.PathLike, cfg: ModelConfig,
         iteration: int | None = None, extra_files: dict[str, str] | None = None,
         extra_dirs: dict[str, str | os.PathLike] | None = None) -> Path:
    """Collective: every rank passes its sharded state dict. Returns the final folder."""
    root = Path(root)
    final = root / tag_for(iteration)
    tmp = root / f"{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / CONFIG).write_text(cfg.to_json())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / TRACKER, final.name if iteration is None else str(iteration))
    _barrier()
    return final


def load_into(model: torch.nn.Module, root: str | os.PathLike) -> Path:
    """Collective: load the checkpoint's weights into `model` at the model's own TP/EP."""
    folder = resolve(root)
    template = model.sharded_state_dict()
    state = dist_checkpointing.load(template, str(folder))
    # A training checkpoint also holds optimizer/scheduler/progress state: weights only here.
    model.load_state_dict({k: v for k, v in state.items() if k in template}, strict=True)
    return folder


def carried(folder: str | os.PathLike) -> tuple[dict[str, str], dict[str, Path]]:
    """(extra_files, extra_dirs) of a checkpoint that every later checkpoint derived from it
    carries along: the imported HF config, the tokenizer, tensors kept aside for export."""
    folder = Path(folder)
    files = {HF_CONFIG: (folder / HF_CONFIG).read_text()} if (folder / HF_CONFIG).exists() \
        else {}
    dirs = {name: folder / name for name in (TOKENIZER, PASSTHROUGH) if (folder / name).is_dir()}
    return files, dirs
