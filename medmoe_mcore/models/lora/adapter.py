"""A LoRA adapter beside one of Megatron-Core's parallel linears, sharded like it:

    y = W x + (alpha / r) * B A dropout(x)

- column-parallel base (output split over TP): A [r, in] on every rank, B [out/TP, r] split
  like W. With sequence parallelism x is first gathered along the sequence (its gradient
  split back, not summed: the adapter's input gradient is already whole); the gradient of
  A x is summed over TP, since each rank's B sees only its part of the output.
- row-parallel base (input split over TP): A [r, in/TP] split like W, B [out, r] on every
  rank. A x is summed over TP (reduce-scattered along the sequence with sequence
  parallelism, where B's gradient is then a per-rank partial that Megatron's
  finalize_model_grads sums, as for the norms: `sequence_parallel` tag).
- expert linears (Megatron's explicit expert communication): plain local matmuls.

A starts as Kaiming-uniform (PEFT's default) drawn whole from a seeded generator and sliced, so
every TP layout holds the same adapter; B starts at zero, so the adapted model equals the base
model until B is trained.

The adapter lives inside its base layer (models/lora/linears.py), so checkpoints and conversions
see `<layer>.lora.a` / `<layer>.lora.b` beside `<layer>.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.tensor_parallel.random import (get_cuda_rng_tracker,
                                                  get_expert_parallel_rng_tracker_name)


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=dim)[rank].contiguous()


class LoRAAdapter(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 seed: int = 0):
        super().__init__()
        if isinstance(base, ColumnParallelLinear):
            self.kind = "column"
        elif isinstance(base, RowParallelLinear):
            self.kind = "row"
        else:
            raise TypeError(f"LoRA needs a Megatron Column/RowParallelLinear, got "
                            f"{type(base).__name__}")
        if rank < 1:
            raise ValueError(f"lora rank={rank}: must be >= 1")
        self.group = base.tp_group
        self.local = bool(getattr(base, "explicit_expert_comm", False))  # experts
        tp, tp_rank = self.group.size(), self.group.rank()
        self.sequence_parallel = bool(base.sequence_parallel) and not self.local
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.tp_rank, self.tp_size = tp_rank, tp
        # the base layer's dtype: bf16 runs keep fp32 main copies in Megatron's optimizer
        device, dtype = base.weight.device, base.weight.dtype
        a_cols = base.input_size // (tp if self.kind == "row" else 1)
        b_rows = base.output_size // (tp if self.kind == "column" else 1)
        self.a = torch.nn.Parameter(torch.empty(rank, a_cols, device=device, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(b_rows, rank, device=device, dtype=dtype))
        # the split factor carries the base weight's TP tags (grad norm, gathers); the
        # replicated one carries none, like a bias of a row-parallel layer
        split, axis = (self.b, 0) if self.kind == "column" else (self.a, 1)
        set_tensor_model_parallel_attributes(split, True, axis, 1)
        if self.kind == "row" and self.sequence_parallel:
            self.b.sequence_parallel = True
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """A: Kaiming-uniform drawn whole from `seed` and sliced like the base layer (the same
        adapter at every TP size); B: zero."""
        gen = torch.Generator().manual_seed(seed)
        a = torch.empty(self.a.shape[0], self.a.shape[1] * (self.tp_size if self.kind == "row"
                                                            else 1))
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        if self.kind == "row":
            a = _shard(a, 1, self.tp_rank, self.tp_size)
        with torch.no_grad():
            self.a.copy_(a)
            self.b.zero_()

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with Megatron's RNG conventions: an input that is the same on every TP
        rank (column layer without SP) draws the same mask there from the default generator;
        a TP-split input (row layer, or SP) draws from the model-parallel tracker, an expert's
        from the expert tracker, so that the default generator advances alike on every TP rank
        whatever tokens each rank's experts received."""
        if not self.training or isinstance(self.dropout, torch.nn.Identity):
            return x
        if self.kind == "column" and not self.sequence_parallel and not self.local:
            return self.dropout(x)
        tracker = get_cuda_rng_tracker()
        with tracker.fork(get_expert_parallel_rng_tracker_name()) if self.local else \
                tracker.fork():  # the model-parallel state
            return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the base layer's output, for the base layer's input x."""
        x = self._dropout(x).to(self.a.dtype)
        if self.local:
            return F.linear(F.linear(x, self.a), self.b) * self.scale
        if self.kind == "column":
            if self.sequence_parallel:
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                         group=self.group)
            h = copy_to_tensor_model_parallel_region(F.linear(x, self.a), group=self.group)
        else:
            h = F.linear(x, self.a)
            h = (reduce_scatter_to_sequence_parallel_region(h, group=self.group)
                 if self.sequence_parallel else
                 reduce_from_tensor_model_parallel_region(h, group=self.group))
        return F.linear(h, self.b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """This rank's share of (alpha / r) B A, shaped like the base layer's local weight."""
        return (self.b @ self.a) * self.scale
