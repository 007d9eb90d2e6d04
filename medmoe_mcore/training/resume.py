"""A run's checkpoint state: the one place that decides "resume or start", and what a
training checkpoint holds (model, optimizer, scheduler, iteration, consumed samples, per-rank
RNG, and the data loader's state per data-parallel rank). Saves are atomic
(store.save); a changed world size reseeds the RNG, says so. The loader's state only
fits the same data, data-parallel size, worker count and micro-batch size (energon restores
nothing else): a resume that changes any of them is refused naming each, unless
`--no-load-data-state` asks for a fresh data order.

Never silent (all decided before the model is built): `--load` at a folder that holds no
checkpoint is an error naming what is there, except a missing or empty folder with
`--pretrained-checkpoint` (a warning names it); a resumed schedule that differs from the
flags is refused naming both unless Megatron's `--override-opt_param-scheduler` /
`--use-checkpoint-opt_param-scheduler` says which wins; a `--save` that would replace another
run's iteration or move the tracker back is refused; checkpoint files are verified against
their recorded checksums (`--no-verify-checkpoint` skips it)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from medmoe_mcore.checkpoint import store
from medmoe_mcore.checkpoint.async_save import AsyncSaver
from medmoe_mcore.checkpoint.lock import FolderLock, FolderLocked
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.runtime import parallel
from medmoe_mcore.runtime.parallel import log
from medmoe_mcore.training import history
from medmoe_mcore.training.config import TrainConfig

_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0


@dataclass
class Start:
    folder: Path  # the checkpoint whose weights the run starts from
    resuming: bool  # the run's own state (optimizer, iteration, ...) continues
    note: str | None = None  # for the log


def starting_point(train: TrainConfig) -> Start:
    """Where the run starts; reads only the folders (no process groups needed)."""
    if train.load is not None:
        try:
            folder = store.resolve(train.load, train.ckpt_step)
        except store.NoCheckpoint as e:
            if train.pretrained_checkpoint is None:
                raise ConfigError(f"--load: {e}: nothing to resume, and no "
                                  "--pretrained-checkpoint to start from") from None
            return Start(_pretrained(train), False,
                         f"WARNING: --load: {e}: nothing to resume; the run starts from "
                         f"--pretrained-checkpoint {train.pretrained_checkpoint} at iteration 0")
        except ConfigError as e:
            raise ConfigError(f"--load: {e}") from None
        if train.finetune:
            return Start(folder, False, f"--finetune: the weights of {folder}; iteration 0, "
                                        "new optimizer, schedule, RNG and data order")
        return Start(folder, True)
    return Start(_pretrained(train), False)


def _pretrained(train: TrainConfig) -> Path:
    try:
        return store.resolve(train.pretrained_checkpoint)
    except (FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"--pretrained-checkpoint: {e}") from None


# the schedule keys a resume compares, with the flags that set them
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr",
                   "lr_warmup_steps": "--lr-warmup-iters / --lr-warmup-fraction",
                   "lr_decay_steps": "--lr-decay-iters / --train-iters",
                   "lr_decay_style": "--lr-decay-style", "init_lr": "--lr-warmup-init",
                   "lr_wsd_decay_style": "--lr-wsd-decay-style",
                   "wsd_decay_steps": "--lr-wsd-decay-iters"}
_OPTIMIZER_FLAGS = {"optimizer": "--optimizer", "adam_beta1": "--adam-beta1",
                    "adam_beta2": "--adam-beta2", "adam_eps": "--adam-eps",
                    "sgd_momentum": "--sgd-momentum"}
# run flags of checkpoints saved before they were recorded: the values those runs used
RUN_FLAGS_BEFORE_KEYS = dict(init_lr=0.0, lr_wsd_decay_style=None, wsd_decay_steps=None,
                             optimizer="adam", adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                             sgd_momentum=0.9)


def run_flag_differences(saved_scheduler: dict, saved_flags: dict | None, train: TrainConfig
                         ) -> dict[str, str]:
    """{key: message} of every schedule or optimizer key where a checkpoint and the flags
    differ, the message naming the flag, its value and the checkpoint's."""
    saved = {**saved_scheduler, **(saved_flags or RUN_FLAGS_BEFORE_KEYS)}
    wanted = {**train.schedule(), **train.run_flags()}
    names = {**_SCHEDULE_FLAGS, **_OPTIMIZER_FLAGS}
    return {k: f"{names[k]} gives {k}={wanted[k]!r}, the checkpoint has {saved.get(k)!r}"
            for k in names if saved.get(k) != wanted[k]}


# data-layout keys added after checkpoints were first saved, with the behaviour of those saves
DATA_LAYOUT_BEFORE_KEYS = {"balanced_modality_batches": False, "pack_sequences": False}

def _lock_save_folder(train: TrainConfig) -> FolderLock | None:
    """Collective: rank 0 takes the --save folder's lock for the run (one run per folder), or
    every rank refuses naming the holder, before any model is built."""
    lock, refusal = None, None
    if dist.get_rank() == 0:
        try:
            lock = FolderLock(train.save, f"training run (stage {train.stage})").acquire()
        except FolderLocked as e:
            refusal = str(e)
    refusal = store.broadcast(refusal)
    if refusal is not None:
        raise FolderLocked(f"--save {refusal}")
    if lock is not None and lock.warning:
        log(lock.warning)
    return lock


class RunCheckpoint:
    """`--load` resumes when it holds a checkpoint of the run; otherwise the stage starts from
    `--pretrained-checkpoint`'s weights. Later saves carry the source's extra files along."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig, data_layout: dict):
        self.cfg, self.train, self.data_layout = cfg, train, data_layout
        self.saver = AsyncSaver() if train.async_save else None
        start = starting_point(train)
        if start.note:
            log(start.note)
        self.resuming, self.source = start.resuming, start.folder
        if train.verify_checkpoint:  # before anything of it is read
            store.verify_files(self.source)
        self.common = store.load_common(self.source) if self.resuming else {}
        self.start_iteration = int(self.common.get("iteration", 0))
        self.loads_data_state = self.resuming and train.load_data_state
        if self.loads_data_state:
            self._check_data_layout()
        if self.resuming:
            self._check_schedule()
            self._check_saved_parts()
        self.lock = None
        if train.save:
            self.lock = _lock_save_folder(train)
            store.check_can_save(train.save, self.start_iteration + 1)

    def close(self) -> None:
        """The run is over: its --save folder is free for another."""
        if self.lock is not None:
            self.lock.release()

    def _check_saved_parts(self) -> None:
        """A checkpoint saved with --no-save-optim / --no-save-rng resumes only when the run
        says it will start those afresh (Megatron-LM would fail on the missing keys)."""
        t, saved = self.train, self.common.get("saved_parts", {})
        same_world = self.common.get("world_size") == dist.get_world_size()
        missing = [f"{flag} (saved with {saved_flag})" for flag, saved_flag, needed in (
            ("--no-load-optim", "--no-save-optim",
             t.load_optim and not saved.get("optimizer", True)),
            ("--no-load-rng", "--no-save-rng",
             t.load_rng and same_world and not saved.get("rng", True))) if needed]
        if missing:
            raise ConfigError(f"--load {self.source}: the checkpoint lacks what this run would "
                              f"resume: pass {', '.join(missing)}")

    def _check_schedule(self) -> None:
        """Megatron's scheduler silently keeps the checkpoint's schedule: refuse a difference
        unless the run says which wins."""
        t = self.train
        differences = run_flag_differences(self.common.get("scheduler", {}),
                                           self.common.get("run_flags"), t)
        optimizer = [m for k, m in differences.items() if k in _OPTIMIZER_FLAGS]
        changed = [m for k, m in differences.items() if k in _SCHEDULE_FLAGS]
        if optimizer and t.load_optim and not t.finetune:
            raise ConfigError(f"--load {self.source}: the optimizer differs from the "
                              f"checkpoint's: {'; '.join(optimizer)}. Its saved state would "
                              "bring its own back: pass --no-load-optim to start the optimizer "
                              "afresh with these flags, or the checkpoint's values")
        unsaved = [m for k, m in differences.items() if k in RUN_FLAGS_BEFORE_KEYS
                   and k in _SCHEDULE_FLAGS]  # not in Megatron's scheduler state
        if t.use_checkpoint_opt_param_scheduler and unsaved:
            raise ConfigError(f"--use-checkpoint-opt_param-scheduler: {'; '.join(unsaved)}, "
                              "and Megatron's scheduler state does not hold these: pass the "
                              "checkpoint's values")
        if t.override_opt_param_scheduler or t.use_checkpoint_opt_param_scheduler:
            log(f"schedule: {'the flags' if t.override_opt_param_scheduler else 'the checkpoint'}"
                f" win ({'--override' if t.override_opt_param_scheduler else '--use-checkpoint'}"
                "-opt_param-scheduler)")
            return
        if changed:
            raise ConfigError(f"--load {self.source}: the schedule differs from the "
                              f"checkpoint's: {'; '.join(changed)}. Pass "
                              "--override-opt_param-scheduler (the flags win) or "
                              "--use-checkpoint-opt_param-scheduler (the checkpoint wins)")

    def _check_data_layout(self) -> None:
        """Before any model is built: the saved loader state fits this run, or it is refused."""
        saved = self.common.get("data_layout")
        if saved is None:
            raise ConfigError(f"--load {self.source}: the checkpoint has no data-loader state "
                              "(saved before the energon loader); --no-load-data-state starts "
                              "the data order afresh")
        # a key newer than the checkpoint: it was saved with that key's old behaviour
        saved = {**DATA_LAYOUT_BEFORE_KEYS, **saved}
        changed = [f"{key}: saved {saved.get(key)!r}, now {value!r}"
                   for key, value in self.data_layout.items() if saved.get(key) != value]
        if changed:
            raise ConfigError(f"--load {self.source}: the data loader cannot resume exactly "
                              f"with {'; '.join(changed)}. Resume with the saved values, or "
                              "pass --no-load-data-state to start the data order afresh")

    def load_starting_weights(self, model: torch.nn.Module) -> None:
        """Before DDP wraps the model: the starting weights of a fresh stage (verified
        already)."""
        if not self.resuming:
            adapters_added = self.cfg.lora is not None and \
                store.read_config(self.source).lora is None
            store.load_into(model, self.source, verify=False,
                                    fresh=(lambda key: ".lora." in key) if adapters_added
                                    else None)
            log(f"initialised stage {self.train.stage} from {self.source} (weights"
                f"{'; LoRA adapters fresh' if adapters_added else ''})")

    def restore(self, setup, data) -> Progress:
        """After the optimizer exists: the whole state of a resumed run (the data loader's
        too), else a fresh start."""
        if not self.resuming:
            return Progress()
        folder, t = self.source, self.train
        same_world = self.common.get("world_size") == dist.get_world_size()
        with_rng = same_world and t.load_rng
        data_length = self.common.get("data_state_bytes") if self.loads_data_state else None
        template = _state(setup, Progress(), loading=True, with_rng=with_rng,
                          data_length=data_length, with_optimizer=t.load_optim)
        state = store.load_sharded(template, folder)
        store.load_weights(setup.model, state["model"], folder)
        if t.load_optim:
            setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        progress = Progress(state["iteration"], state["consumed_samples"])
        if with_rng:
            set_rng_state(state["rng"])
        if data_length is not None:
            row = state["data_state"][0]
            size = int(row[:8].view(torch.int64))
            data.restore_bytes(row[8:8 + size].numpy().tobytes(), str(folder))
        fresh = [what for what, new in (
            ("optimizer state (--no-load-optim)", not t.load_optim),
            ("RNG (other world size)" if not same_world else "RNG (--no-load-rng)",
             not with_rng),
            ("data order", data_length is None)) if new]
        log(f"resumed from {folder}: iteration {progress.iteration}, consumed samples "
            f"{progress.consumed_samples}"
            f"{'; started afresh: ' + ', '.join(fresh) if fresh else ''}")
        return progress

    def save(self, setup, progress: Progress, data) -> Path:
        """Collective: a checkpoint of now; with --async-save its files are written in the
        background and it becomes the latest at `finish_saves` (the folder it will be)."""
        files, dirs = store.carried(self.source)
        files[store.TRAINING_STAGES] = history.updated(
            files.get(store.TRAINING_STAGES), history.stage_entry(
                self.train, progress.iteration, progress.consumed_samples,
                self.data_layout["datasets"]))
        t = self.train
        state = _state(setup, progress, loading=False, data_state=data.state_bytes(),
                       with_rng=t.save_rng, with_optimizer=t.save_optim)
        state["saved_parts"] = {"optimizer": t.save_optim, "rng": t.save_rng}
        state["data_layout"] = self.data_layout
        state["run_flags"] = self.train.run_flags()
        if self.saver is not None:  # carried files keep coming from the complete source
            return self.saver.save(state, self.train.save, self.cfg, progress.iteration,
                                   files, dirs)
        folder = store.save(state, self.train.save, self.cfg, iteration=progress.iteration,
                            extra_files=files, extra_dirs=dirs)
        self.source = folder
        log(f"saved checkpoint at iteration {progress.iteration} to {folder}")
        return folder

    def finish_saves(self, wait: bool = False) -> None:
        """Collective: background saves whose files are written become complete (all of
        them, waiting, with `wait`); nothing to do for synchronous saves."""
        if self.saver is not None:
            self.saver.finish(wait)


def _state(setup, progress: Progress, loading: bool, with_rng: bool = True,
           data_state: bytes | None = None, data_length: int | None = None,
           with_optimizer: bool = True) -> dict:
    model_sd = store.portable(setup.model.sharded_state_dict())
    state = {"model": model_sd,
             "scheduler": setup.scheduler.state_dict(),
             "iteration": progress.iteration, "consumed_samples": progress.consumed_samples,
             "world_size": dist.get_world_size()}
    if with_optimizer:
        state["optimizer"] = setup.optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=_OPT_METADATA)
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    if data_state is not None:  # saving: every rank's length agreed on first (a collective)
        length = torch.tensor(8 + len(data_state), device=parallel.device())
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        data_length = int(length)
        state["data_state_bytes"] = data_length
    if data_length is not None:
        state["data_state"] = _data_state_tensor(data_state, data_length)
    return state


def _data_state_tensor(payload: bytes | None, length: int) -> ShardedTensor:
    """The loader state of this data-parallel rank as one uint8 row (8-byte length, bytes,
    zeros) of a [DP, length] tensor: plain bytes in the checkpoint, no pickle. Ranks that
    share the data-parallel rank hold the same state; one of them writes it."""
    row = torch.zeros((1, length), dtype=torch.uint8)
    if payload is not None:
        row[0, :8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        row[0, 8:8 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    peer = dist.get_rank(group=parallel_state.get_model_parallel_group())
    return ShardedTensor.from_rank_offsets(
        "data_state", row, (0, parallel_state.get_data_parallel_rank(),
                            parallel_state.get_data_parallel_world_size()), replica_id=peer)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
