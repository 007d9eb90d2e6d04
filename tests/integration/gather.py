"""Gather TP/EP-sharded tensors into Megatron's single-rank (TP=1, EP=1) layout."""

import re

import torch
import torch.distributed as dist

_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)\.")


def full_tensor(param, tensor, tp_group, gated: bool):
    """Gather a TP-sharded tensor into Megatron's TP=1 layout."""
    if not getattr(param, "tensor_model_parallel", False) or tp_group.size() == 1:
        return tensor.clone()
    dim = param.partition_dim
    parts = [torch.empty_like(tensor) for _ in range(tp_group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    if gated:  # each rank holds [gate_r; up_r]
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def global_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """Local expert index -> global expert index (experts are whole on each rank: ETP=1)."""
    return _LOCAL_EXPERT.sub(
        lambda m: f"{m.group(1)}{ep_rank * num_local_experts + int(m.group(2))}.", name)


def full_grads(model, gated: bool) -> dict:
    """Every parameter's main_grad held by this rank, in the single-rank layout."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".experts." in name:
            num_local = model.config.num_moe_experts // ep_size
            grads[global_name(name, ep_rank, num_local)] = param.main_grad.clone()
            continue
        grads[name] = full_tensor(param, param.main_grad, tp_group,
                                  gated and name.endswith(("linear_fc1.weight",
                                                           "linear_fc1.lora.b")))
    return grads
