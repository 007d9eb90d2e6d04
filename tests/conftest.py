import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def single_rank():
    """A single-process gloo group + Megatron parallel state (TP=EP=1): the entry point of
    in-process tests (library code never creates process groups)."""
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.runtime import parallel

    parallel.initialize(ParallelConfig())
    return True


def run_tool(*args, nproc: int = 1, timeout: int = 300, show_warnings: bool = False):
    """Run a tool as a user would: python, or torchrun for nproc > 1. Returns CompletedProcess.
    Python warnings are off unless `show_warnings` (the main-job test counts them)."""
    import subprocess

    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.pop("PYTHONWARNINGS", None)
    env.update(OMP_NUM_THREADS="1", **({} if show_warnings else {"PYTHONWARNINGS": "ignore"}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
