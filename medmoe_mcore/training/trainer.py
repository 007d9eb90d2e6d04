"""One training stage on Megatron-Core: the loop. Set-up (training/setup.py), checkpoint state
(training/checkpoint.py) and logs (training/metrics.py) are components; process groups are the
entry point's (runtime.parallel.initialize), created before a Trainer.

No argv here: examples/pretrain_medmoe.py builds `TrainConfig` from its flags.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.data.loader import Batches, EncodedDataset
from medmoe_mcore.runtime import parallel
from medmoe_mcore.runtime.parallel import log
from medmoe_mcore.training import setup as training_setup
from medmoe_mcore.training.checkpoint import RunCheckpoint
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.metrics import TrainingMetrics


class StepResult(NamedTuple):
    loss: float  # mean over the global batch (all data-parallel ranks)
    grad_norm: float  # NaN when the step was skipped
    lr: float
    tokens: int  # tokens this rank processed
    skipped: bool  # non-finite loss or gradients: no update


class Trainer:
    def __init__(self, cfg: ModelConfig, train: TrainConfig):
        self.cfg, self.train = cfg, train
        self.dp = parallel_state.get_data_parallel_world_size()
        train.validate(self.dp)
        cfg.validate()
        self.checkpoint = RunCheckpoint(cfg, train)
        model, trainable = training_setup.stage_model(cfg, train)
        self.checkpoint.load_starting_weights(model)
        self.setup = training_setup.wrap(model, trainable, cfg, train)
        self.progress = self.checkpoint.restore(self.setup)
        self.data = EncodedDataset(train.data_path, train.tokenizer, train.template_or_default,
                                   train.seq_length, cfg)
        log(self.data.summary())
        self.batches = Batches(self.data, train.global_batch_size, train.micro_batch_size,
                               parallel_state.get_data_parallel_rank(), self.dp, train.seed)
        self.metrics = TrainingMetrics(train.train_iters, train.log_interval, self.dp,
                                       train.tensorboard_dir, train.stage)
        self.losses: list[float] = []

    @property
    def model(self):
        return self.setup.model

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    def save(self):
        return self.checkpoint.save(self.setup, self.progress)

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

    def step(self) -> StepResult:
        """One global batch."""
        s, p = self.setup, self.progress
        micro = self.batches.global_batch(p.consumed_samples)
        tokens = sum(int(b["input_ids"].numel()) for b in micro)
        s.ddp.zero_grad_buffer()
        s.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro), model=[s.ddp],
            num_microbatches=len(micro), seq_length=self.train.seq_length,
            micro_batch_size=self.train.micro_batch_size, forward_only=False)
        loss = torch.stack([x["lm loss"] for x in losses]).mean()
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = (loss / self.dp).item()
        grad_norm, skipped = float("nan"), True
        if math.isfinite(loss):
            ok, norm, _ = s.optimizer.step()
            skipped = not ok
            grad_norm = norm if norm is not None else float("nan")
        lr = s.optimizer.param_groups[0]["lr"]
        s.scheduler.step(increment=1)
        p.iteration += 1
        p.consumed_samples += self.train.global_batch_size
        return StepResult(loss, grad_norm, lr, tokens, skipped)

    def run(self) -> list[float]:
        t = self.train
        saved = False
        self.metrics.start_window()
        while self.progress.iteration < t.train_iters:
            result = self.step()
            self.losses.append(result.loss)
            it = self.progress.iteration
            self.metrics.record(it, self.progress.consumed_samples, result)
            saved = bool(t.save and t.save_interval and it % t.save_interval == 0)
            if saved:
                self.save()
            if t.exit_interval and it % t.exit_interval == 0:
                if t.save and not saved:  # exiting never loses the work done
                    self.save()
                log(f"exiting at iteration {it} (--exit-interval)")
                break
        else:
            if t.save and not saved:
                self.save()
        self.metrics.close()
        return self.losses
