"""Process groups for CPU (gloo) and GPU (nccl) runs, for entry points only (examples/, tools/,
tests): library code never creates them. Reads no global args; `MEDMOE_DEVICE=cpu|cuda`
overrides device detection."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ParallelConfig
from medmoe_mcore.conventions import DEFAULT_SEED
from medmoe_mcore.runtime import cpu as cpu_runtime
from medmoe_mcore.runtime import quiet

DEVICE_ENV = "MEDMOE_DEVICE"


def use_cuda() -> bool:
    """CUDA unless MEDMOE_DEVICE says otherwise; MEDMOE_DEVICE=cuda on a node whose CUDA is
    broken fails here instead of training silently on CPU."""
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted not in ("", "cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}={wanted!r}: must be 'cpu' or 'cuda'")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return torch.cuda.is_available() if wanted == "" else wanted == "cuda"


def initialize(parallel: ParallelConfig, seed: int = DEFAULT_SEED) -> None:
    """Init torch.distributed from torchrun's env (or a single process) and Megatron's groups."""
    on_gpu = use_cuda()
    if not on_gpu:
        cpu_runtime.activate(force=True)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun sets MASTER_ADDR/PORT; a lone process gets a free port without writing it
        # into os.environ (child processes would inherit it and collide).
        init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        # a stalled rank ends the run after this long instead of hanging it (Megatron-LM's
        # --distributed-timeout-minutes); the first initialize of a process sets it
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=init, rank=rank,
                                world_size=world, timeout=timedelta(
                                    minutes=parallel.distributed_timeout_minutes))
    if not on_gpu:
        cpu_runtime.announce(is_rank0())
    _say_once(quiet.te_missing_note())
    world = dist.get_world_size()
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not divisible by tensor_model_parallel_size x "
                          f"pipeline_model_parallel_size = {model_parallel}")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    # Python's and NumPy's global generators too, as Megatron-LM's _set_random_seed (nothing
    # in training draws from them today; a run's saved random state is then its seed's)
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)


def started() -> bool:
    """Whether process groups exist already (an entry point asks at its start, to know
    whether the groups it ends with are its own to tear down)."""
    return dist.is_initialized()


def finish(tear_down: bool = True) -> None:
    """An entry point's orderly end: every rank done with its collectives, then (when the
    entry point created them: `not started()` at its start) the groups torn down together; a
    rank leaving while others still tear down can abort in gloo. A caller's groups (an
    in-process caller, such as a test) are left alone."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if tear_down:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if not cpu_runtime.is_active() \
        and torch.cuda.is_available() else torch.device("cpu")


def is_rank0() -> bool:
    """Rank 0 of the process groups, or of the launch (torchrun's RANK) before they exist."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    """Print once, on rank 0."""
    if is_rank0():
        print(msg, flush=True)


_SAID: set[str] = set()


def _say_once(note: str | None) -> None:
    if note and note not in _SAID:
        _SAID.add(note)
        log(note)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
