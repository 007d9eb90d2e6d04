"""Packed rows against the same samples unpacked at TP2+SP (torchrun, 2 ranks, gloo), dense
and Med-MoE: each rank checks the loss and the gradients it holds, after summing the partial
gradients that depend on which rank holds which positions: the sequence-parallel parameters'
over the TP group, the experts' (replicated over TP ranks, each taking its own positions'
tokens) over the expert-data-parallel group, as DDP would.

    torchrun --nproc-per-node 2 packing_step.py
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from megatron.core import parallel_state

    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.runtime import parallel
    from tests.unit.test_packing import compare_packed_with_unpacked, tiny_model

    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    parallel.initialize(par, seed=3)

    def reduce_grads(grads):
        for name, p in model.named_parameters():
            if name not in grads:
                continue
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(grads[name],
                                group=parallel_state.get_tensor_model_parallel_group())
            elif not getattr(p, "allreduce", True):  # an expert's
                dist.all_reduce(grads[name],
                                group=parallel_state.get_expert_data_parallel_group())
        return grads

    for experts in (0, 4):
        model, cfg = tiny_model(experts, parallel=par)
        compare_packed_with_unpacked(model, cfg, reduce_grads)
        print(f"rank {dist.get_rank()}: packed equals unpacked at TP2+SP, {experts} experts")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
