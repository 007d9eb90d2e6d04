"""One training stage on Megatron-Core: DDP + Megatron optimizer + cosine schedule, gradient
accumulation to the global batch, the stage's freeze set, Megatron-style logs and TensorBoard,
distributed checkpoints that resume exactly (model, optimizer, scheduler, RNG, data position).

No argv here: examples/pretrain_medmoe.py maps Megatron-LM flags onto `TrainConfig`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from medmoe_mcore import checkpointing
from medmoe_mcore.runtime import parallel
from medmoe_mcore.config import ConfigError, ModelConfig
from medmoe_mcore.data.loader import Batches, EncodedDataset
from medmoe_mcore.training.freezing import apply_stage
from medmoe_mcore.models.medmoe import build_model


@dataclass
class TrainConfig:
    stage: int
    data_path: str
    tokenizer: str
    train_iters: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    seed: int = 1234
    template: Optional[str] = None  # default: plain for stage 1, phi for stages 2-3
    save: Optional[str] = None
    load: Optional[str] = None
    pretrained_checkpoint: Optional[str] = None
    save_interval: Optional[int] = None
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    use_distributed_optimizer: bool = False
    train_projector: bool = True  # stage 3
    exit_interval: Optional[int] = None  # stop (after saving) at this iteration

    def validate(self, dp: int) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"--stage {self.stage}: must be 1, 2 or 3")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                              f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                              f"{dp}")
        if self.load is None and self.pretrained_checkpoint is None:
            raise ConfigError("--load or --pretrained-checkpoint: a model to start from is needed")


def _rank0() -> bool:
    return dist.get_rank() == 0


def log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


class Trainer:
    def __init__(self, cfg: ModelConfig, train: TrainConfig):
        self.cfg, self.train = cfg, train
        parallel.initialize(cfg.parallel, seed=train.seed)
        self.dp = parallel_state.get_data_parallel_world_size()
        train.validate(self.dp)
        cfg.validate()
        self.model = build_model(cfg).to(parallel.device())
        self.trainable = apply_stage(self.model, train.stage, train.train_projector,
                                     cfg.moe is not None and cfg.moe.router_type == "learned")
        self.iteration, self.consumed = 0, 0
        resume = train.load and _has_checkpoint(train.load)
        if not resume:
            checkpointing.load_into(self.model, train.pretrained_checkpoint)
            log(f"initialised stage {train.stage} from {train.pretrained_checkpoint} (weights)")
        self.source = checkpointing.resolve(train.load if resume else train.pretrained_checkpoint)
        self.ddp = DistributedDataParallel(
            self.model.config, DistributedDataParallelConfig(
                use_distributed_optimizer=train.use_distributed_optimizer,
                grad_reduce_in_fp32=True), self.model)
        self.model.config.no_sync_func = self.ddp.no_sync
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr,
            weight_decay=train.weight_decay, clip_grad=train.clip_grad,
            bf16=cfg.params_dtype == "bfloat16", params_dtype=self.model.config.params_dtype,
            use_distributed_optimizer=train.use_distributed_optimizer), [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
            lr_warmup_steps=int(train.lr_warmup_fraction * train.train_iters),
            lr_decay_steps=train.train_iters, lr_decay_style="cosine", start_wd=0.0,
            end_wd=0.0, wd_incr_steps=train.train_iters, wd_incr_style="constant")
        if resume:
            self._load(train.load)
        template = train.template or ("plain" if train.stage == 1 else "phi")
        self.data = EncodedDataset(train.data_path, train.tokenizer, template,
                                   train.seq_length, cfg)
        log(self.data.summary())
        self.batches = Batches(self.data, train.global_batch_size, train.micro_batch_size,
                               parallel_state.get_data_parallel_rank(), self.dp, train.seed)
        self.writer = None
        if train.tensorboard_dir and _rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(train.tensorboard_dir)
        self.losses: list[float] = []

    # ---- checkpoints -------------------------------------------------------------------
    def _state(self, loading: bool, with_rng: bool = True) -> dict:
        model_sd = self.model.sharded_state_dict()
        state = {"model": model_sd,
                 "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                                 metadata=_OPT_METADATA),
                 "scheduler": self.scheduler.state_dict(),
                 "iteration": self.iteration, "consumed_samples": self.consumed,
                 "world_size": dist.get_world_size()}
        if with_rng:
            rank, world = dist.get_rank(), dist.get_world_size()
            state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,),
                                         replica_id=0)
        return state

    def save(self) -> Path:
        files, dirs = checkpointing.carried(self.source)
        folder = checkpointing.save(self._state(loading=False), self.train.save, self.cfg,
                                    iteration=self.iteration, extra_files=files,
                                    extra_dirs=dirs)
        self.source = folder
        log(f"saved checkpoint at iteration {self.iteration} to {folder}")
        return folder

    def _load(self, root) -> None:
        folder = checkpointing.resolve(root)
        common = dist_checkpointing.load_common_state_dict(str(folder))
        same_world = common.get("world_size") == dist.get_world_size()
        state = dist_checkpointing.load(self._state(loading=True, with_rng=same_world),
                                        str(folder))
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.consumed = state["iteration"], state["consumed_samples"]
        if same_world:
            _set_rng_state(state["rng"])
        log(f"resumed from {folder}: iteration {self.iteration}, consumed samples "
            f"{self.consumed}{'' if same_world else ' (other world size: RNG reseeded)'}")

    # ---- training ----------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = parallel.device()
        images = batch["images"].to(dev, self.model.config.params_dtype) \
            if batch["images"] is not None else None
        loss, mask = model(batch["input_ids"].to(dev), images, labels=batch["labels"].to(dev))

        def loss_func(output):
            per_token, m = output
            m = m.float()
            value = (per_token.float() * m).sum() / m.sum().clamp(min=1)
            # a copy: the schedule divides the returned loss in place by the micro-batch count
            return value, {"lm loss": value.detach().clone()}

        return (loss, mask), loss_func

    def step(self) -> tuple[float, float, float, int, bool]:
        """One global batch: (loss, grad norm, lr, tokens on this rank, step skipped)."""
        micro = self.batches.global_batch(self.consumed)
        tokens = sum(int(b["input_ids"].numel()) for b in micro)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro), model=[self.ddp],
            num_microbatches=len(micro), seq_length=self.train.seq_length,
            micro_batch_size=self.train.micro_batch_size, forward_only=False)
        loss = torch.stack([x["lm loss"] for x in losses]).mean()
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = (loss / self.dp).item()
        if math.isfinite(loss):
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok
        else:
            grad_norm, skipped = float("nan"), True
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed += self.train.global_batch_size
        return loss, (grad_norm if grad_norm is not None else float("nan")), lr, tokens, skipped

    def run(self) -> list[float]:
        t = self.train
        skipped = nan = 0
        saved = False
        start = time.time()
        window_tokens = 0
        while self.iteration < t.train_iters:
            loss, grad_norm, lr, tokens, was_skipped = self.step()
            self.losses.append(loss)
            skipped += was_skipped
            nan += not math.isfinite(loss)
            window_tokens += tokens
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                elapsed = (time.time() - start) / t.log_interval
                world_tokens = window_tokens * self.dp / max(time.time() - start, 1e-9)
                log(f" iteration {self.iteration:8d}/{t.train_iters:8d} | consumed samples: "
                    f"{self.consumed:10d} | elapsed time per iteration (ms): "
                    f"{elapsed * 1000:.1f} | tokens/s: {world_tokens:.0f} | learning rate: "
                    f"{lr:.6E} | lm loss: {loss:.6E} | grad norm: {grad_norm:.3f} | "
                    f"number of skipped iterations: {skipped:3d} | number of nan iterations: "
                    f"{nan:3d} |")
                if not math.isfinite(loss):
                    log(f" WARNING: non-finite loss {loss} at iteration {self.iteration}")
                if self.writer:
                    for name, value in (("lm-loss", loss), ("learning-rate", lr),
                                        ("grad-norm", grad_norm), ("tokens-per-sec",
                                                                   world_tokens)):
                        self.writer.add_scalar(name, value, self.iteration)
                    self.writer.flush()
                start, window_tokens = time.time(), 0
            saved = bool(t.save and t.save_interval and self.iteration % t.save_interval == 0)
            if saved:
                self.save()
            if t.exit_interval and self.iteration % t.exit_interval == 0:
                if t.save and not saved:  # exiting never loses the work done
                    self.save()
                log(f"exiting at iteration {self.iteration} (--exit-interval)")
                return self.losses
        if t.save and not saved:
            self.save()
        return self.losses


_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _has_checkpoint(root) -> bool:
    try:
        checkpointing.resolve(root)
        return True
    except FileNotFoundError:
        return False


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])
