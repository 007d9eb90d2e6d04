"""Grouped experts (`--moe-grouped-gemm`, moe/experts.py's GroupedExperts on
`torch._grouped_mm`) against the sequential experts they replace: the output, the input
gradient and every weight and bias gradient within 1e-5 relative (float32), at 1, 4 and 64
experts, with empty experts and skewed loads, with and without Megatron's `main_grad`."""

import pytest
import torch

from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig


def _pair(flavor: str, experts: int):
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from medmoe_mcore.models.moe.experts import GroupedExperts, LeanSequentialMLP
    from medmoe_mcore.models.specs.backends import LOCAL
    from medmoe_mcore.models.transformer_config import language_transformer_config

    cfg = ModelConfig(language=language_flavor(flavor),
                      moe=MoEConfig(num_experts=max(experts, 2), router_topk=1)).validate()
    config = language_transformer_config(cfg)
    sub = MLPSubmodules(linear_fc1=LOCAL.expert_column_linear,
                        linear_fc2=LOCAL.expert_row_linear)
    grouped, sequential = (build_module(ModuleSpec(module=cls, submodules=sub), experts, config,
                                        pg_collection=get_default_pg_collection())
                           for cls in (GroupedExperts, LeanSequentialMLP))
    torch.manual_seed(0)
    with torch.no_grad():
        for a, b in zip(grouped.parameters(), sequential.parameters()):
            a.normal_(0, 0.05)
            b.copy_(a)
    return cfg, grouped, sequential


LOADS = {1: [[13], [0]], 4: [[5, 0, 7, 3], [0, 0, 40, 1]],
         64: [[i % 3 for i in range(64)], [0] * 63 + [50]]}


@pytest.mark.parametrize("flavor", ["tiny", "tiny_stablelm"])
@pytest.mark.parametrize("experts", [1, 4, 64])
@pytest.mark.parametrize("main_grad", [False, True])
def test_grouped_experts_equal_the_sequential_experts(single_rank, flavor, experts, main_grad):
    cfg, grouped, sequential = _pair(flavor, experts)
    held = 2.0 ** -10  # what the buffer held before (small: its float32 ulp stays tiny)
    for load in LOADS[experts]:
        counts = torch.tensor(load)
        x = torch.randn(int(counts.sum()), cfg.language.hidden_size)
        probs = torch.rand(len(x))
        results = []
        for module in (grouped, sequential):
            for p in module.parameters():
                p.grad = None
                if main_grad:
                    p.main_grad, p.grad_added_to_main_grad = torch.full_like(p, held), False
            xi = x.clone().requires_grad_()
            out, bias = module(xi, counts, probs)
            assert bias is None and out.shape == x.shape
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            grads = [p.main_grad - held if getattr(p, "grad_added_to_main_grad", False)
                     else p.grad for p in module.parameters()]
            results.append((out, xi.grad, grads))
        (o1, g1, p1), (o2, g2, p2) = results
        if main_grad:
            assert all(p.grad_added_to_main_grad == (p.dim() == 2)
                       for p in grouped.parameters())
        for name, a, b in zip(["output", "input grad", *(n for n, _ in
                                                       grouped.named_parameters())],
                              [o1, g1, *p1], [o2, g2, *p2]):
            scale = b.abs().max().clamp_min(1e-12) if b.numel() else torch.tensor(1.0)
            assert a.shape == b.shape and (a.numel() == 0 or
                                           ((a - b).abs().max() / scale).item() < 1e-5), (name, load)
        assert len(x) == 0 or o1.abs().max() > 0.05
