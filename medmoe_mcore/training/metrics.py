"""Megatron-style training logs: one line per `--log-interval` iterations (iteration, consumed
samples, time per iteration, tokens/s, the share of it spent waiting for data, lr, loss, grad
norm, skipped and NaN iterations) and
the same figures to TensorBoard, in one subfolder per stage."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from medmoe_mcore.runtime.parallel import is_rank0, log


class TrainingMetrics:
    def __init__(self, train_iters: int, log_interval: int, dp: int,
                 tensorboard_dir: Optional[str] = None, stage: Optional[int] = None):
        self.train_iters, self.log_interval, self.dp = train_iters, log_interval, dp
        self.skipped = self.nan = 0
        self.start_window()
        self.writer = None
        if tensorboard_dir and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(tensorboard_dir) / (f"stage{stage}" if stage is not None else "")
            self.writer = SummaryWriter(str(folder))

    def start_window(self) -> None:
        self._window_start, self._window_iters, self._window_tokens = time.time(), 0, 0
        self._window_data_seconds = 0.0

    def record(self, iteration: int, consumed_samples: int, result) -> bool:
        """Count one step (a trainer.StepResult); log when a window is complete (True)."""
        self.skipped += result.skipped
        self.nan += not math.isfinite(result.loss)
        self._window_iters += 1
        self._window_tokens += result.tokens
        self._window_data_seconds += result.data_seconds
        if iteration % self.log_interval and iteration != self.train_iters:
            return False
        seconds = max(time.time() - self._window_start, 1e-9)
        # A short last window (train_iters not a multiple of log_interval) divides by its own
        # length, not by log_interval.
        per_iteration = seconds / self._window_iters
        tokens_per_s = self._window_tokens * self.dp / seconds
        data_wait = 100 * self._window_data_seconds / seconds
        log(f" iteration {iteration:8d}/{self.train_iters:8d} | consumed samples: "
            f"{consumed_samples:10d} | elapsed time per iteration (ms): "
            f"{per_iteration * 1000:.1f} | tokens/s: {tokens_per_s:.0f} | data wait (%): "
            f"{data_wait:.1f} | learning rate: "
            f"{result.lr:.6E} | lm loss: {result.loss:.6E} | grad norm: {result.grad_norm:.3f} | "
            f"number of skipped iterations: {self.skipped:3d} | number of nan iterations: "
            f"{self.nan:3d} |")
        if not math.isfinite(result.loss):
            log(f" WARNING: non-finite loss {result.loss} at iteration {iteration}")
        if self.writer:
            for name, value in (("lm-loss", result.loss), ("learning-rate", result.lr),
                                ("grad-norm", result.grad_norm),
                                ("tokens-per-sec", tokens_per_s),
                                ("iteration-time-ms", per_iteration * 1000),
                                ("data-wait-percent", data_wait)):
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()
        self.start_window()
        return True

    def validation(self, iteration: int, loss: float, seconds: float) -> None:
        """Megatron's validation block; its time is left out of the iteration times."""
        ppl = math.exp(min(20.0, loss))
        line = (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} |")
        log("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self._window_start += seconds
        if self.writer:
            self.writer.add_scalar("lm-loss-validation", loss, iteration)
            self.writer.add_scalar("lm-loss-validation-ppl", ppl, iteration)
            self.writer.flush()

    def expert_load(self, iteration: int, counts, layer_numbers: list[int]) -> None:
        """Share of each MoE layer's routed (non-padding) tokens per expert since the last
        point (models/moe/stats.py counts): `expert-load/layer{n}/expert{e}`."""
        from medmoe_mcore.models.moe.stats import load_per_layer

        if self.writer:
            for layer, row in zip(layer_numbers, load_per_layer(counts).tolist()):
                for expert, share in enumerate(row):
                    self.writer.add_scalar(f"expert-load/layer{layer:02d}/expert{expert}",
                                           share, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
