"""Ending a run before --train-iters without losing work, Megatron-LM's way.

`--exit-signal-handler`: the chosen signal (`--exit-signal`, default SIGTERM, what Slurm sends
before a job's time limit) and SIGINT are caught on every rank; the ranks agree at the end of
the current iteration, save a complete checkpoint and exit 0. A second signal during the save
only sets the flag again (saves are atomic in any case: a killed save leaves the previous
checkpoint the latest). `--exit-duration-in-mins`: the same once the process has run that long
(the wall clock since it started). Both are checked collectively after every iteration (one
all-reduce of two integers), so every rank stops on the same iteration.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from medmoe_mcore.runtime import parallel

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


class ExitConditions:
    """The run's reasons to stop early; `check()` is a collective of every rank."""

    def __init__(self, handle_signals: bool, exit_signal: Optional[str],
                 duration_minutes: Optional[float]):
        self.received: Optional[str] = None
        self.duration = duration_minutes
        self.deadline = None if duration_minutes is None else \
            psutil.Process().create_time() + 60.0 * duration_minutes
        self.signals = sorted({exit_signal or "SIGTERM", "SIGINT"}) if handle_signals else []
        self._previous = {name: signal.signal(getattr(signal, name), self._caught)
                          for name in self.signals}

    @property
    def active(self) -> bool:
        return bool(self.signals) or self.deadline is not None

    def _caught(self, signum, frame) -> None:
        if self.received is None:  # the first signal names the reason; later ones change nothing
            self.received = signal.Signals(signum).name

    def check(self) -> Optional[str]:
        """Collective: why every rank stops after this iteration, or None to go on."""
        if not self.active:
            return None
        late = self.deadline is not None and time.time() >= self.deadline
        flags = torch.tensor([self.received is not None, late], dtype=torch.int32,
                             device=parallel.device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"{self.received or 'a signal'} received by a rank (--exit-signal-handler)"
        if flags[1]:
            return f"--exit-duration-in-mins {self.duration:g} reached"
        return None

    def close(self) -> None:
        """The process's own handlers back (the run is over)."""
        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        self._previous = {}
