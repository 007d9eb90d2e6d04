"""Megatron distributed checkpoints (torch_dist) in Megatron-LM's directory layout.

    ROOT/latest_checkpointed_iteration.txt   "release" or an iteration number
    ROOT/release/ or ROOT/iter_0000100/      dist_checkpointing shards + medmoe_config.json
                                             (+ hf_config.json, tokenizer/ when imported)

A save goes to a temporary folder that is renamed only after every rank finished, and the
tracker file moves last (atomically), so an interrupted save never replaces a good checkpoint.
A save never replaces an existing iteration folder and never moves the tracker backwards; a
release (conversion) into a folder that holds any checkpoint is refused unless `overwrite`,
which replaces the folder whole. Every save records each file's size and SHA-256
(integrity.py); loading verifies them first. One writer per folder (lock.py): a training run
holds its --save folder's lock for the whole run, a conversion for its save, and each save's
temporary folder is named uniquely, so two writers can never mix their files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from medmoe_mcore.checkpoint import integrity
from medmoe_mcore.checkpoint.lock import LOCK, FolderLock, refuse_if_held
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.runtime.parallel import log

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG = "medmoe_config.json"
HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer"
PASSTHROUGH = "hf_passthrough"  # HF tensors kept aside on import (never run), for export
TRAINING_STAGES = "training_stages.json"  # training/history.py: what each stage trained with
EXTRA_STATE = "._extra_state"  # a module's non-parameter state (see `portable`)


def tag_for(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every rank (itself where there are no process groups)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class NoCheckpoint(FileNotFoundError):
    """The folder does not exist, is empty, or holds only an interrupted save: nothing there
    (a run may start afresh when it was told where from)."""


def iterations(root: Path) -> list[int]:
    """The complete iteration folders under `root` (with a config), oldest first."""
    found = []
    for p in root.glob("iter_*"):
        if p.is_dir() and (p / CONFIG).exists() and p.name[5:].isdigit():
            found.append(int(p.name[5:]))
    return sorted(found)


def _listing(root: Path, limit: int = 6) -> str:
    names = sorted(p.name for p in root.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if
                                       len(names) > limit else "")


def resolve(root: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint folder `root` means: the iteration its tracker names (or `step`'s), or
    `root` itself if it holds a config. Otherwise NoCheckpoint (nothing there) or
    ConfigError naming what was found."""
    root = Path(root)
    if not root.exists():
        raise NoCheckpoint(f"{root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file, not a checkpoint folder")
    if step is not None:
        folder = root / tag_for(step)
        if not (folder / CONFIG).exists():
            raise ConfigError(f"{root}: no complete iteration {step} ({folder.name}); "
                              f"iterations there: {iterations(root) or 'none'}")
        return folder
    if (root / CONFIG).exists():
        return root
    tracker = root / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise ConfigError(f"{tracker}: {text!r} is neither 'release' nor an iteration")
        folder = root / (text if text == "release" else tag_for(int(text)))
        if not (folder / CONFIG).exists():
            raise ConfigError(f"{tracker} names {folder.name}, which is missing or has no "
                              f"{CONFIG}; complete iterations there: "
                              f"{iterations(root) or 'none'}")
        return folder
    found = iterations(root)
    if found:
        raise ConfigError(f"{root}: no {TRACKER}, but iteration folders "
                          f"{tag_for(found[0])} .. {tag_for(found[-1])} (newest {found[-1]}); "
                          f"pass --ckpt-step {found[-1]} to use the newest (or another)")
    entries = [p for p in root.iterdir() if p.name != LOCK]
    if not entries:
        raise NoCheckpoint(f"{root} is empty")
    if all(".tmp" in p.name for p in entries):
        raise NoCheckpoint(f"{root} holds only an interrupted save ({_listing(root)})")
    if (root / "config.json").exists() or any(root.glob("*.safetensors")):
        raise ConfigError(f"{root} holds a Hugging Face model ({_listing(root)}), not a "
                          "Megatron checkpoint: convert it with tools/convert_hf_to_mcore.py")
    raise ConfigError(f"{root} holds no checkpoint (no {TRACKER}, no {CONFIG}; found: "
                      f"{_listing(root)})")


def is_checkpoint(root: str | os.PathLike) -> bool:
    try:
        resolve(root)
        return True
    except (FileNotFoundError, ConfigError):
        return False


def read_config(root: str | os.PathLike, parallel: ParallelConfig | None = None) -> ModelConfig:
    path = resolve(root) / CONFIG
    try:
        return ModelConfig.from_json(path.read_text(), parallel=parallel)
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def check_can_save(root: str | os.PathLike, iteration: int) -> None:
    """A training save of `iteration` into `root` would replace nothing and not move the
    tracker backwards (called before training too, so a run never computes for a save it
    cannot make)."""
    root = Path(root)
    if not root.exists():
        return
    if (root / tag_for(None)).exists() or (root / CONFIG).exists():
        raise ConfigError(f"--save {root} holds a converted checkpoint (release), not a "
                          "training run: save the run elsewhere")
    later = [i for i in iterations(root) if i >= iteration]
    tracker = root / TRACKER
    marked = tracker.read_text().strip() if tracker.exists() else None
    if later:
        raise ConfigError(f"--save {root} already holds {tag_for(later[0])}"
                          f"{f' .. {tag_for(later[-1])}' if len(later) > 1 else ''} "
                          f"(another run's work, at or beyond this run's iteration "
                          f"{iteration}): it is never replaced; save elsewhere")
    if marked is not None and marked.isdigit() and int(marked) >= iteration:
        raise ConfigError(f"{tracker} says {marked}: saving iteration {iteration} would move "
                          "it backwards; save elsewhere")


def _holds_checkpoint(root: Path) -> bool:
    return (root / TRACKER).exists() or (root / CONFIG).exists() or \
        (root / tag_for(None)).exists() or bool(iterations(root))


def check_can_release(root: str | os.PathLike, overwrite: bool) -> None:
    """A conversion may write its release into `root`: refused where a live process owns the
    folder (lock.py), or where it holds any checkpoint (a training run included) unless
    `overwrite` (called before converting)."""
    refuse_if_held(root)
    _check_release_target(Path(root), overwrite)


def _check_release_target(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--save {root}: a file, not a folder")
    if root.exists() and _holds_checkpoint(root) and not overwrite:
        marked = (root / TRACKER).read_text().strip() if (root / TRACKER).exists() else ""
        latest = marked if marked.isdigit() else (iterations(root) or [None])[-1]
        what = f"a training run (latest iteration {latest})" if latest is not None \
            else "a checkpoint"
        raise ConfigError(f"--save {root} holds {what} ({_listing(root)}): choose another "
                          "folder, or --overwrite to replace it whole")


@dataclass(frozen=True)
class SaveTarget:
    """Where a save is written (`tmp`) and what it becomes once complete."""

    root: Path
    target: Path  # the root, or `root.new` while a release replaces a folder
    final: Path
    tmp: Path
    replacing: bool
    lock: FolderLock | None = None  # a release's, held until the save completes


def begin_save(root: str | os.PathLike, iteration: int | None = None,
               overwrite: bool = False) -> SaveTarget:
    """Collective: the checks of `save`, then its empty temporary folder."""
    root = Path(root)
    replacing = iteration is None and root.exists() and _holds_checkpoint(root)
    lock = None
    if iteration is None:
        _check_release_target(root, overwrite)
        if _rank() == 0:  # a training run holds its folder's lock already (resume.py)
            lock = FolderLock(root, "a conversion's save").acquire()
            if lock.warning:
                log(lock.warning)
    else:
        check_can_save(root, iteration)
    _barrier()  # every rank checked the same folder before anyone writes
    target = root.with_name(f"{root.name}.new") if replacing else root
    final = target / tag_for(iteration)
    # unique per save: two writers can never share a temporary folder
    tmp = target / f"{final.name}.tmp-{broadcast(os.urandom(6).hex())}"
    if _rank() == 0:
        if replacing:
            shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    return SaveTarget(root, target, final, tmp, replacing, lock)


def complete_save(to: SaveTarget, cfg: ModelConfig, iteration: int | None = None,
                  extra_files: dict[str, str] | None = None,
                  extra_dirs: dict[str, str | os.PathLike] | None = None,
                  known_checksums: dict | None = None) -> Path:
    """Collective, once every rank's shards are in `to.tmp`: the config and carried files,
    the checksum record, then the folder renamed and the tracker moved (last, atomically).
    `known_checksums`: this rank's entries computed where its files were written."""
    _barrier()
    if _rank() == 0:
        (to.tmp / CONFIG).write_text(cfg.to_json())
        for name, text in (extra_files or {}).items():
            (to.tmp / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, to.tmp / name)
    _barrier()
    integrity.record(to.tmp, known_checksums)
    if _rank() == 0:
        os.replace(to.tmp, to.final)
        _write_atomic(to.target / TRACKER, to.final.name if iteration is None else str(iteration))
        if to.replacing:  # the old folder moves aside only now, then goes
            aside = to.root.with_name(f"{to.root.name}.old-{os.getpid()}")
            os.replace(to.root, aside)
            os.replace(to.target, to.root)
            shutil.rmtree(aside)
    if to.lock is not None:
        to.lock.release()
    _barrier()
    return to.root / to.final.name


def save(sharded_state_dict: dict, root: str | os.PathLike, cfg: ModelConfig,
         iteration: int | None = None, extra_files: dict[str, str] | None = None,
         extra_dirs: dict[str, str | os.PathLike] | None = None,
         overwrite: bool = False) -> Path:
    """Collective: every rank passes its sharded state dict. Returns the final folder. A
    training save (`iteration`) is refused where it would replace an iteration or move the
    tracker back; a release into a folder holding a checkpoint is refused unless `overwrite`
    (then the whole folder is replaced once the new one is complete). Asynchronous saves:
    checkpoint/async_save.py."""
    to = begin_save(root, iteration, overwrite)
    dist_checkpointing.save(portable(sharded_state_dict), str(to.tmp))
    return complete_save(to, cfg, iteration, extra_files, extra_dirs)


def verify_files(folder: Path) -> None:
    """Collective: the folder's files match its save's record (or say there is none)."""
    if not integrity.verify(folder):
        log(f"WARNING: {folder}: no {integrity.MANIFEST} (saved by an older version or "
            "another tool): its files are not verified")


def load_into(model: torch.nn.Module, root: str | os.PathLike, verify: bool = True,
              fresh: Callable[[str], bool] | None = None) -> Path:
    """Collective: load the checkpoint's weights into `model` at the model's own TP/EP (its
    files checked against their recorded checksums first, unless `verify=False`). `fresh`
    names the model's keys the checkpoint does not hold (new LoRA adapters): they keep their
    initial values; every other key must be there."""
    folder = resolve(root)
    if verify:
        verify_files(folder)
    template = {k: v for k, v in portable(model.sharded_state_dict()).items()
                if fresh is None or not fresh(k)}
    state = load_sharded(template, folder)
    # A training checkpoint also holds optimizer/scheduler/progress state: weights only here.
    load_weights(model, {k: v for k, v in state.items() if k in template}, folder, fresh)
    return folder


def portable(state: dict) -> dict:
    """`state` without modules' `_extra_state` entries (Transformer Engine's carry FP8
    metadata, the local linears' are empty): no save writes them and no load asks for them, so
    a checkpoint is the same whichever backend (`--transformer-impl`) wrote it and loads into
    either, each module keeping its default extra state."""
    return {k: portable(v) if isinstance(v, dict) else v for k, v in state.items()
            if not (isinstance(k, str) and k.endswith(EXTRA_STATE))}


def load_weights(model: torch.nn.Module, weights: dict, folder: Path,
                 fresh: Callable[[str], bool] | None = None) -> None:
    """The loaded weights into `model`: every key of the model but its `_extra_state` entries
    (see `portable`) and the `fresh` ones must be there, and nothing else."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = [k for k in missing if not k.endswith(EXTRA_STATE) and not (fresh and fresh(k))]
    wrong += list(unexpected)
    if wrong:
        raise ConfigError(f"{folder}: the model's keys do not match the checkpoint's: {wrong}")


def _reason(error: BaseException) -> str:
    """One line: a rank's own error inside torch's CheckpointException (whose text is a
    traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, failure = next(iter(error.failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_first_line(inner)}"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return type(error).__name__ + (f": {text.splitlines()[0]}" if text else "")


def load_sharded(template: dict, folder: Path) -> dict:
    """dist_checkpointing.load, with a failure naming the folder (a shard cut short raises
    errors that name no file)."""
    try:
        return dist_checkpointing.load(template, str(folder))
    except (Exception, CheckpointException) as e:  # any reader error (the latter is a
        # BaseException): say where
        raise ConfigError(f"{folder}: cannot read the checkpoint ({_reason(e)}); "
                          f"a shard may be truncated or corrupt (files: {_listing(folder)})"
                          ) from e


def load_common(folder: Path) -> dict:
    """The checkpoint's common state (iteration, schedule, ...), a failure named like
    `load_sharded`'s (an unsafe pickle inside is refused by torch's weights-only reader)."""
    try:
        return dist_checkpointing.load_common_state_dict(str(folder))
    except (Exception, CheckpointException) as e:
        raise ConfigError(f"{folder}: cannot read the checkpoint's common state ({_reason(e)})"
                          ) from e


def carried(folder: str | os.PathLike) -> tuple[dict[str, str], dict[str, Path]]:
    """(extra_files, extra_dirs) of a checkpoint that every later checkpoint derived from it
    carries along: the imported HF config, the training history, the tokenizer, tensors kept
    aside for export."""
    folder = Path(folder)
    files = {name: (folder / name).read_text() for name in (HF_CONFIG, TRAINING_STAGES)
             if (folder / name).exists()}
    dirs = {name: folder / name for name in (TOKENIZER, PASSTHROUGH) if (folder / name).is_dir()}
    return files, dirs
