"""Megatron-LM's --manual-gc: Python's automatic garbage collector paused for the run (its
collections stall a rank at moments of its own choosing, which other ranks then wait for),
with a collection at the start, every --manual-gc-interval iterations (0: never) and after each
validation (unless --no-manual-gc-eval); the collector is switched back on when the run ends."""

from __future__ import annotations

import gc


class ManualGC:
    def __init__(self, enabled: bool, interval: int, after_eval: bool):
        self.enabled, self.interval, self.after_eval = enabled, interval, after_eval
        self._was_enabled = gc.isenabled()
        if enabled:
            gc.disable()
            gc.collect()

    def step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def evaluated(self) -> None:
        if self.enabled and self.after_eval:
            gc.collect()

    def close(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()
