"""LoRA adapters on column- and row-parallel linears under torchrun, against the closed-form
single-device computation: output, input gradient, and every adapter gradient.

    torchrun --nproc_per_node 2 lora_parity.py [--sequence-parallel]

Rank 0 prints one JSON line: the largest absolute difference of each quantity.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

S, B, N_IN, N_OUT, RANK, ALPHA = 8, 2, 32, 48, 4, 8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sequence-parallel", action="store_true")
    args = p.parse_args()

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ModelConfig, ParallelConfig
    from medmoe_mcore.models.lora.adapter import LoRAAdapter
    from medmoe_mcore.models.transformer_config import language_transformer_config
    from medmoe_mcore.runtime import parallel

    tp = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    par = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=args.sequence_parallel)
    parallel.initialize(par)
    rank = dist.get_rank()
    config = language_transformer_config(
        ModelConfig(language=language_flavor("tiny"), parallel=par).validate())
    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(S, B, N_IN, generator=gen)
    w_full = torch.randn(N_OUT, N_IN, generator=gen) * 0.1
    bias = torch.randn(N_OUT, generator=gen) * 0.1
    b_full = torch.randn(N_OUT, RANK, generator=gen) * 0.1
    probe = torch.randn(S, B, N_OUT, generator=gen)  # loss = sum(out * probe)
    diffs = {}
    for kind, cls, extra in (("column", ColumnParallelLinear, dict(gather_output=False)),
                             ("row", RowParallelLinear, dict(input_is_parallel=True))):
        base = cls(N_IN, N_OUT, config=config, init_method=config.init_method, bias=True,
                   skip_bias_add=False, **extra)
        adapter = LoRAAdapter(base, RANK, ALPHA, seed=7)
        with torch.no_grad():
            if kind == "column":
                base.weight.copy_(w_full.chunk(tp, 0)[rank])
                base.bias.copy_(bias.chunk(tp, 0)[rank])
                adapter.b.copy_(b_full.chunk(tp, 0)[rank])
            else:
                base.weight.copy_(w_full.chunk(tp, 1)[rank])
                base.bias.copy_(bias)
                adapter.b.copy_(b_full)
        for q in base.parameters():
            q.requires_grad_(False)
        x = x_full
        if kind == "row":
            x = x_full.chunk(tp, 2)[rank]
        elif args.sequence_parallel:
            x = x_full.chunk(tp, 0)[rank]
        x = x.clone().requires_grad_()
        out = base(x)[0] + adapter(x)
        # the single-device reference, with the whole A (all ranks' slices gathered)
        a_parts = [torch.empty_like(adapter.a) for _ in range(tp)]
        dist.all_gather(a_parts, adapter.a.detach())
        # column: every rank holds the whole A; row: each its slice of the input dimension
        a_ref = a_parts[0] if kind == "column" else torch.cat(a_parts, dim=1)
        a_ref = a_ref.clone().requires_grad_()
        b_ref = b_full.clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        ref = torch.nn.functional.linear(x_ref, w_full, bias) + \
            (x_ref @ a_ref.T @ b_ref.T) * (ALPHA / RANK)
        (ref * probe).sum().backward()
        if kind == "column":  # output split over TP (hidden dim)
            ref_out, p = ref.chunk(tp, 2)[rank], probe.chunk(tp, 2)[rank]
        elif args.sequence_parallel:  # row + SP: output split along the sequence
            ref_out, p = ref.chunk(tp, 0)[rank], probe.chunk(tp, 0)[rank]
        else:
            ref_out, p = ref, probe
        (out * p).sum().backward()
        if adapter.b.grad is not None and getattr(adapter.b, "sequence_parallel", False):
            dist.all_reduce(adapter.b.grad)  # what finalize_model_grads does for these
        if kind == "column":
            x_grad_ref = x_ref.grad.chunk(tp, 0)[rank] if args.sequence_parallel else x_ref.grad
            a_grad_ref, b_grad_ref = a_ref.grad, b_ref.grad.chunk(tp, 0)[rank]
        else:
            x_grad_ref = x_ref.grad.chunk(tp, 2)[rank]
            a_grad_ref, b_grad_ref = a_ref.grad.chunk(tp, 1)[rank], b_ref.grad
        for name, got, want in (("out", out, ref_out), ("x_grad", x.grad, x_grad_ref),
                                ("a_grad", adapter.a.grad, a_grad_ref),
                                ("b_grad", adapter.b.grad, b_grad_ref)):
            d = torch.tensor((got.detach() - want.detach()).abs().max().item())
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
            diffs[f"{kind}_{name}"] = d.item()
    if rank == 0:
        print(json.dumps(diffs), flush=True)
    parallel.finish()


if __name__ == "__main__":
    main()
