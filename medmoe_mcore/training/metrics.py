"""Megatron-style training logs: one line per `--log-interval` iterations (iteration, consumed
samples, time per iteration, with `--log-throughput` the model TFLOP/s per GPU (models/flops.py),
tokens/s, the share of it spent waiting for data, lr, loss, grad norm, skipped and NaN
iterations) and the same figures to rank 0's sinks (training/log_sinks.py: TensorBoard, W&B)."""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from medmoe_mcore.runtime.parallel import device, is_rank0, log
from medmoe_mcore.training.log_sinks import open_sinks


def params_norm(model) -> float:
    """Megatron-LM's --log-params-norm: the L2 norm of the whole model's parameters, each
    counted once (tensor-parallel duplicates by their first copy; experts summed over the
    expert tensor- and expert-parallel ranks that hold them). Collective."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sums = torch.zeros(2, dtype=torch.float64, device=device())
    for p in model.parameters():
        expert = getattr(p, "allreduce", True) is False
        if expert or param_is_not_tensor_parallel_duplicate(p):
            sums[int(expert)] += p.detach().double().pow(2).sum()
    dense, experts = sums[:1].clone(), sums[1:].clone()
    dist.all_reduce(dense, group=ps.get_tensor_model_parallel_group())
    dist.all_reduce(experts, group=ps.get_expert_tensor_and_model_parallel_group())
    return float((dense + experts).sqrt().item())


class TrainingMetrics:
    def __init__(self, train, dp: int, config: Optional[dict] = None,
                 dp_group=None):
        """`train` a TrainConfig; `config` what W&B records of the run; `dp_group` the
        data-parallel group whose ranks' FLOPs make up a step (--log-throughput)."""
        self.train_iters, self.log_interval, self.dp = train.train_iters, train.log_interval, dp
        self.log_throughput, self.dp_group = train.log_throughput, dp_group
        self.points_interval = train.tensorboard_log_interval
        self.skipped = self.nan = 0
        self.start_window()
        self.sinks = open_sinks(train, config or {}) if is_rank0() else []

    def start_window(self) -> None:
        self._window_start, self._window_iters, self._window_tokens = time.time(), 0, 0
        self._window_data_seconds, self._window_flops = 0.0, 0

    def is_log_iteration(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def record(self, iteration: int, consumed_samples: int, result,
               params_norm: Optional[float] = None) -> bool:
        """Count one step (a trainer.StepResult); log when a window is complete (True)."""
        self.skipped += result.skipped
        self.nan += not math.isfinite(result.loss)
        self._window_iters += 1
        self._window_tokens += result.tokens
        self._window_data_seconds += result.data_seconds
        self._window_flops += result.flops
        point = {"lm-loss": result.loss, "learning-rate": result.lr,
                 "grad-norm": result.grad_norm}
        if not self.is_log_iteration(iteration):
            if iteration % self.points_interval == 0:
                self._write(point, iteration)  # --tensorboard-log-interval
            return False
        seconds = max(time.time() - self._window_start, 1e-9)
        # A short last window (train_iters not a multiple of log_interval) divides by its own
        # length, not by log_interval.
        per_iteration = seconds / self._window_iters
        tokens_per_s = self._window_tokens * self.dp / seconds
        data_wait = 100 * self._window_data_seconds / seconds
        scalars = {**point, "tokens-per-sec": tokens_per_s,
                   "iteration-time-ms": per_iteration * 1000, "data-wait-percent": data_wait}
        if params_norm is not None:
            scalars["params-norm"] = params_norm
        throughput = ""
        if self.log_throughput:
            tflops = self._tflops_per_gpu(seconds)
            scalars["throughput"] = tflops
            throughput = f" throughput per GPU (TFLOP/s/GPU): {tflops:.3f} |"
        log(f" iteration {iteration:8d}/{self.train_iters:8d} | consumed samples: "
            f"{consumed_samples:10d} | elapsed time per iteration (ms): "
            f"{per_iteration * 1000:.1f} |{throughput} tokens/s: {tokens_per_s:.0f} | "
            f"data wait (%): "
            f"{data_wait:.1f} | learning rate: "
            f"{result.lr:.6E} | lm loss: {result.loss:.6E} | grad norm: {result.grad_norm:.3f} | "
            + (f"params norm: {params_norm:.3f} | " if params_norm is not None else "") +
            f"number of skipped iterations: {self.skipped:3d} | number of nan iterations: "
            f"{self.nan:3d} |")
        if not math.isfinite(result.loss):
            log(f" WARNING: non-finite loss {result.loss} at iteration {iteration}")
        self._write(scalars, iteration)
        self.start_window()
        return True

    def _tflops_per_gpu(self, seconds: float) -> float:
        """The window's model FLOPs over every data-parallel rank's micro-batches (one
        collective, at log iterations only), per GPU of the job and second (Megatron-LM's
        throughput)."""
        flops = torch.tensor([float(self._window_flops)], dtype=torch.float64, device=device())
        if self.dp_group is not None:
            dist.all_reduce(flops, group=self.dp_group)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return float(flops.item()) / (seconds * world * 1e12)

    def _write(self, scalars: dict, iteration: int) -> None:
        for sink in self.sinks:
            sink.scalars(scalars, iteration)

    def validation(self, iteration: int, loss: float, seconds: float) -> None:
        """Megatron's validation block; its time is left out of the iteration times."""
        ppl = math.exp(min(20.0, loss))
        line = (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} |")
        log("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self._window_start += seconds
        self._write({"lm-loss-validation": loss, "lm-loss-validation-ppl": ppl}, iteration)

    def expert_load(self, iteration: int, counts, layer_numbers: list[int]) -> None:
        """Share of each MoE layer's routed (non-padding) tokens per expert since the last
        point (models/moe/stats.py counts): `expert-load/layer{n}/expert{e}`."""
        from medmoe_mcore.models.moe.stats import load_per_layer

        if self.sinks:
            self._write({f"expert-load/layer{layer:02d}/expert{expert}": share
                         for layer, row in zip(layer_numbers, load_per_layer(counts).tolist())
                         for expert, share in enumerate(row)}, iteration)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
