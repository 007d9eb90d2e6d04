"""CPU runtime layer: lets the real Megatron-Core code paths run on CPU with gloo.

Megatron-Core 0.16 assumes CUDA in a handful of places. Every adaptation we need lives in this
module, each with a comment saying what it fixes. `activate()` is a no-op when CUDA is present,
so GPU runs use Megatron-Core untouched.

What is adapted (measured on megatron-core 0.16.1, torch 2.13 CPU, gloo):
1. Tensors created with device="cuda"/current_device(), `.cuda()`, `pin_memory`, `record_stream`
   and clip_grads' `grad.type() == 'torch.cuda.FloatTensor'` assertion: one TorchFunctionMode
   maps them to CPU. The mode is also pushed inside the autograd engine (custom Function
   backwards such as activation recompute), which otherwise runs without it.
2. torch.cuda.current_device/Stream/Event/stream/current_stream/synchronize and the CUDA RNG
   functions: CPU stand-ins (streams are no-ops; CPU execution is already ordered).
3. The CUDA RNG tracker: a CPU tracker keeping named CPU generator states, so dropout inside
   tensor-parallel regions and recompute-with-dropout stay reproducible.
4. `moe_utils.te_general_gemm` is undefined without Transformer Engine (NameError in the router).
5. gloo collectives: `all_to_all_single` wants split sizes as lists, not tensors; `all_gather`
   refuses uneven tensors (used by the alltoall dispatcher at TP>1): pad, gather, slice.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_FAKE_CUDA_TYPES = {"torch.FloatTensor": "torch.cuda.FloatTensor"}


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to CPU; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Fix 1: route every CUDA placement request to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads.py asserts grad.type() == 'torch.cuda.FloatTensor'.
            name = func(*args)
            return _FAKE_CUDA_TYPES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """Fix 2: a stream stand-in; CPU work is already executed in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _CpuStream()


def _patch_cuda_namespace():
    """Fix 2: CPU stand-ins for the torch.cuda functions Megatron calls unconditionally."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.Stream = _CpuStream  # a class: libraries use torch.cuda.Stream in annotations
    cuda.Event = _CpuEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = torch.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_rng_tracker():
    """Fix 3: a CPU RNG tracker with the CUDA tracker's API (named CPU generator states)."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_moe_utils():
    """Fix 4: without TE the name `te_general_gemm` is never bound in moe_utils."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _is_gloo(group):
    return dist.get_backend(group) == "gloo"


def _patch_gloo_collectives():
    """Fix 5: gloo's all_to_all_single split sizes and uneven all_gather."""
    orig_all_to_all_single = dist.all_to_all_single
    orig_all_gather = dist.all_gather

    def as_list(sizes):
        return sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes

    @functools.wraps(orig_all_to_all_single)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        return orig_all_to_all_single(output, input, as_list(output_split_sizes),
                                      as_list(input_split_sizes), group=group, async_op=async_op)

    @functools.wraps(orig_all_gather)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.shape[0] if t.dim() else 1 for t in tensor_list]
        if len(set(sizes)) <= 1 or not _is_gloo(group) or tensor.dim() == 0:
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [padded.new_empty(padded.shape) for _ in tensor_list]
        orig_all_gather(gathered, padded, group=group)
        for out, got, n in zip(tensor_list, gathered, sizes):
            out.copy_(got[:n])
        return None

    dist.all_to_all_single = all_to_all_single
    dist.all_gather = all_gather


def _patch_autograd_engine(mode_factory):
    """Fix 1 (backward half): custom autograd Functions run their backward without our mode."""
    from torch.autograd.function import BackwardCFunction

    orig_apply = BackwardCFunction.apply

    def apply(self, *args):
        with mode_factory():
            return orig_apply(self, *args)

    BackwardCFunction.apply = apply


SUPPORTED_MEGATRON = "0.16."  # the line every adaptation above was measured on
_ANNOUNCED = False


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def activate(force: bool = False) -> bool:
    """Install the CPU runtime once per process when CUDA is absent (or `force`: the user
    asked for CPU on a GPU node). Returns True if active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_cuda_namespace()
    _patch_rng_tracker()
    _patch_moe_utils()
    _patch_gloo_collectives()
    _patch_autograd_engine(CudaToCpuMode)
    CudaToCpuMode().__enter__()  # stays pushed for the life of the process (main thread)
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE


def announce(rank0: bool) -> None:
    """Say once (rank 0) that the CPU runtime is on, and whether this megatron-core is the
    line it was written for."""
    global _ANNOUNCED
    if _ANNOUNCED or not _ACTIVE:
        return
    _ANNOUNCED = True
    if not rank0:
        return
    version = megatron_version()
    print(f"[medmoe] CPU runtime active: Megatron-Core {version} on CPU with gloo "
          f"(MEDMOE_DEVICE=cuda refuses to run without a GPU)", flush=True)
    if not version.startswith(SUPPORTED_MEGATRON):
        print(f"[medmoe] WARNING: megatron-core {version} is installed; the CPU runtime layer "
              f"was written and tested for {SUPPORTED_MEGATRON}x", flush=True)
