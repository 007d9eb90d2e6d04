"""The module classes a layer spec is built from, chosen by `--transformer-impl` (Megatron-LM's
flag and values): `local` (pure PyTorch, the default everywhere) or `transformer_engine`
(refused where TE is not importable). Un-fused TE modules keep the local parameter names, so
one conversion table serves both, and checkpoints never carry backend-specific state
(checkpoint/store.py): a checkpoint loads into either backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ParallelConfig
from medmoe_mcore.models.moe.experts import GroupedExperts, LeanSequentialMLP
from medmoe_mcore.models.specs.layers import ExpertRowParallelLinear
from medmoe_mcore.models.specs.norm import LayerNorm
from medmoe_mcore.models.specs.sdpa import SDPAttention


@dataclass(frozen=True)
class Backend:
    """The module classes one backend provides; a spec is built from exactly these."""

    name: str  # the --transformer-impl value
    description: str  # what runs, said in the start-up log
    norm: type
    column_linear: type
    row_linear: type
    core_attention: type
    expert_column_linear: type
    expert_row_linear: type
    experts: type
    grouped_experts: type | None = None  # --moe-grouped-gemm's experts (same parameters)


# experts: the routed experts' compute, the routing weight applied after fc2 (moe/experts.py)
# core attention: torch's SDPA kernels (same results as Megatron's unfused DotProductAttention,
# tests/unit/test_sdpa.py), without its [b, heads, s, s] score tensor
LOCAL = Backend("local", "Megatron-Core's local (PyTorch) modules, core attention on torch "
                "scaled_dot_product_attention", LayerNorm, ColumnParallelLinear,
                RowParallelLinear, SDPAttention, ColumnParallelLinear, ExpertRowParallelLinear,
                LeanSequentialMLP, GroupedExperts)
# --moe-grouped-gemm's default per device (measured: docs/benchmarks.md, "MoE layer against its
# dense FFNs"): torch's grouped GEMM is the Hopper fast path; on CPU the sequential experts'
# weight-left MKL products are faster.
GROUPED_BY_DEFAULT = {"cuda": True, "cpu": False}
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
    return Backend("transformer_engine", "Transformer Engine modules, core attention on TE's "
                   "DotProductAttention (flash / fused kernels)", TENorm, TEColumnParallelLinear,
                   TERowParallelLinear, TEDotProductAttention, TEColumnParallelLinear,
                   TERowParallelLinear, SequentialMLP)


def backend_for(transformer_impl: str) -> Backend:
    """The backend of a `--transformer-impl` value; TE where it is not importable is refused
    naming the flag (ParallelConfig.validate says the same before anything is built)."""
    if transformer_impl == LOCAL.name:
        return LOCAL
    te = transformer_engine_backend() if transformer_impl == "transformer_engine" else None
    if te is None:
        raise ConfigError(f"--transformer-impl {transformer_impl}: not available here (choose "
                          f"'local', or install Transformer Engine for 'transformer_engine')")
    return te


def run_backend(parallel: ParallelConfig) -> Backend:
    """The backend of a run: `--transformer-impl`'s, with the grouped experts when
    `--moe-grouped-gemm` is on (unset: the default of the device the run uses)."""
    from medmoe_mcore.runtime.parallel import device

    backend = backend_for(parallel.transformer_impl)
    grouped = parallel.moe_grouped_gemm
    if grouped is None:
        grouped = GROUPED_BY_DEFAULT[device().type]
    if not grouped:
        return backend
    if backend.grouped_experts is None:
        raise ConfigError(f"--moe-grouped-gemm with --transformer-impl {backend.name}: not "
                          "available (Transformer Engine's grouped experts keep other "
                          "checkpoint keys); use --transformer-impl local")
    return dataclasses.replace(backend, experts=backend.grouped_experts)


def announce(transformer_impl: str) -> str:
    """The start-up log line: which backend runs, and its attention kernel."""
    backend = backend_for(transformer_impl)
    return f"--transformer-impl {backend.name}: {backend.description}"
