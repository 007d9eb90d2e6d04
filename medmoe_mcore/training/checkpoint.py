"""A run's checkpoint state: the one place that decides "resume or start", and what a
training checkpoint holds (model, optimizer, scheduler, iteration, consumed samples, per-rank
RNG). Saves are atomic (checkpointing.save); a changed world size reseeds the RNG, says so."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from medmoe_mcore import checkpointing
from medmoe_mcore.config import ModelConfig
from medmoe_mcore.runtime.parallel import log
from medmoe_mcore.training.config import TrainConfig

_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0


class RunCheckpoint:
    """`--load` resumes when it holds a checkpoint of the run; otherwise the stage starts from
    `--pretrained-checkpoint`'s weights. Later saves carry the source's extra files along."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig):
        self.cfg, self.train = cfg, train
        self.resuming = bool(train.load) and checkpointing.is_checkpoint(train.load)
        self.source = checkpointing.resolve(train.load if self.resuming
                                            else train.pretrained_checkpoint)

    def load_starting_weights(self, model: torch.nn.Module) -> None:
        """Before DDP wraps the model: the pretrained weights of a fresh stage."""
        if not self.resuming:
            checkpointing.load_into(model, self.train.pretrained_checkpoint)
            log(f"initialised stage {self.train.stage} from {self.train.pretrained_checkpoint} "
                "(weights)")

    def restore(self, setup) -> Progress:
        """After the optimizer exists: the whole state of a resumed run, else a fresh start."""
        if not self.resuming:
            return Progress()
        folder = self.source
        common = dist_checkpointing.load_common_state_dict(str(folder))
        same_world = common.get("world_size") == dist.get_world_size()
        state = dist_checkpointing.load(_state(setup, Progress(), loading=True,
                                               with_rng=same_world), str(folder))
        setup.model.load_state_dict(state["model"], strict=True)
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        progress = Progress(state["iteration"], state["consumed_samples"])
        if same_world:
            set_rng_state(state["rng"])
        log(f"resumed from {folder}: iteration {progress.iteration}, consumed samples "
            f"{progress.consumed_samples}"
            f"{'' if same_world else ' (other world size: RNG reseeded)'}")
        return progress

    def save(self, setup, progress: Progress) -> Path:
        files, dirs = checkpointing.carried(self.source)
        folder = checkpointing.save(_state(setup, progress, loading=False), self.train.save,
                                    self.cfg, iteration=progress.iteration, extra_files=files,
                                    extra_dirs=dirs)
        self.source = folder
        log(f"saved checkpoint at iteration {progress.iteration} to {folder}")
        return folder


def _state(setup, progress: Progress, loading: bool, with_rng: bool = True) -> dict:
    model_sd = setup.model.sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": setup.optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                              metadata=_OPT_METADATA),
             "scheduler": setup.scheduler.state_dict(),
             "iteration": progress.iteration, "consumed_samples": progress.consumed_samples,
             "world_size": dist.get_world_size()}
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    return state


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
