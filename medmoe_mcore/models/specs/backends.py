"""The module classes a layer spec is built from: the local (pure PyTorch) backend, or
Transformer Engine's when it is importable (GPU/NGC). Un-fused TE modules keep the local
parameter names, so one conversion table serves both."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

from medmoe_mcore.models.moe.experts import LeanSequentialMLP

from medmoe_mcore.models.specs.layers import ExpertRowParallelLinear
from medmoe_mcore.models.specs.norm import LayerNorm
from medmoe_mcore.models.specs.sdpa import SDPAttention


@dataclass(frozen=True)
class Backend:
    """The module classes one backend provides; a spec is built from exactly these."""

    name: str
    norm: type
    column_linear: type
    row_linear: type
    core_attention: type
    expert_column_linear: type
    expert_row_linear: type
    experts: type


# experts: the routed experts' compute, the routing weight applied after fc2 (moe/experts.py)
# core attention: torch's SDPA kernels (same results as Megatron's unfused DotProductAttention,
# tests/unit/test_sdpa.py), without its [b, heads, s, s] score tensor
LOCAL = Backend("local", LayerNorm, ColumnParallelLinear, RowParallelLinear, SDPAttention,
                ColumnParallelLinear, ExpertRowParallelLinear, LeanSequentialMLP)


def transformer_engine_backend() -> Backend | None:
    """The TE backend when Transformer Engine is importable, else None."""
    try:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )
        import transformer_engine  # noqa: F401
    except ImportError:
        return None
    return Backend("te", TENorm, TEColumnParallelLinear, TERowParallelLinear,
                   TEDotProductAttention, TEColumnParallelLinear, TERowParallelLinear,
                   SequentialMLP)


def default_backend() -> Backend:
    return transformer_engine_backend() or LOCAL
