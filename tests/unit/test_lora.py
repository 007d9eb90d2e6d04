"""LoRA adapters on Megatron's parallel linears (issue 16, first piece): at TP = 1, a zero B
leaves the output exactly the base's, a trained adapter equals the merged weight, and only
A and B learn."""

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.flavors import language_flavor
from medmoe_mcore.lora.adapter import LoRAAdapter


def _linear(cls, config, n_in, n_out):
    extra = dict(gather_output=False) if cls is ColumnParallelLinear else \
        dict(input_is_parallel=True)
    return cls(n_in, n_out, config=config, init_method=config.init_method, bias=True,
               skip_bias_add=False, **extra)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_adapter_starts_as_the_base_and_merges_exactly(single_rank, cls):
    from medmoe_mcore.models.transformer_config import language_transformer_config

    config = language_transformer_config(ModelConfig(language=language_flavor("tiny")).validate())
    base = _linear(cls, config, 64, 96)
    for p in base.parameters():
        p.requires_grad_(False)
    adapter = LoRAAdapter(base, rank=8, alpha=16, seed=3)
    assert adapter.a.shape == (8, 64) and adapter.b.shape == (96, 8)
    x = torch.randn(5, 2, 64)
    plain, _ = base(x)
    assert torch.equal(plain + adapter(x), plain)  # B = 0: exactly the base model
    with torch.no_grad():
        adapter.b.normal_(0, 0.1)
    out = base(x)[0] + adapter(x)
    merged = torch.nn.functional.linear(x, base.weight + adapter.delta_weight(), base.bias)
    assert (out - merged).abs().max() < 1e-5
    out.square().sum().backward()
    assert adapter.a.grad.abs().sum() > 0 and adapter.b.grad.abs().sum() > 0
    assert base.weight.grad is None
    again = LoRAAdapter(base, rank=8, alpha=16, seed=3)
    assert torch.equal(again.a, adapter.a)  # seeded: the same A on every rank and layout


def test_adapter_refuses_what_it_cannot_wrap(single_rank):
    with pytest.raises(TypeError, match="needs a Megatron Column/RowParallelLinear, got Linear"):
        LoRAAdapter(torch.nn.Linear(4, 4), rank=2, alpha=4)
