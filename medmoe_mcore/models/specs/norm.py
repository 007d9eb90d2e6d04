"""LayerNorm usable with sequence parallelism (Megatron's WrappedTorchNorm refuses SP)."""

from __future__ import annotations

import torch


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm built from a TransformerConfig.

    Under sequence parallelism every TP rank holds a replica that sees only its own sequence
    chunk; Megatron sums the grads of parameters tagged `sequence_parallel` over the TP group
    (finalize_model_grads). Without the tag the replicas drift apart silently.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
