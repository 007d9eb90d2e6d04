"""The Med-MoE router: a fixed, pretrained modality classifier in Megatron's router slot.

G = softmax(W x + b) over all experts (float32); the top-k are kept, renormalised only when
asked (the authors' top-2 does, their top-1 does not). Per token, or per sample (pooled).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import TopKRouter

from medmoe_mcore.config.model import MoEConfig


class ModalityRouter(MegatronModule):
    """Frozen `Linear(hidden, E)` with bias, in float32, trained offline as a modality classifier.

    Called by MoELayer as `router(hidden_states [S_local, B, H], padding_mask)`; returns float32
    probs [T, E] (zero outside the top-k) and a bool routing map [T, E] with exactly top-k
    experts per token, tokens in Megatron's order s * B + b.
    """

    def __init__(self, config, pg_collection=None, granularity: str = "token",
                 renormalize: bool = False):
        super().__init__(config)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.renormalize = renormalize
        self.granularity = granularity
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.layer_number = None
        # Placeholder values: the real weights come from a router file (upcycling) or a
        # checkpoint. Frozen: never in an optimizer, never reduced by DDP.
        self.weight = torch.nn.Parameter(
            torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32),
            requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32),
                                       requires_grad=False)
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None):
        x = hidden_states.float()
        if self.granularity == "sample":
            # Pool over the whole sequence: with SP each rank holds S/TP positions, so gather
            # them first (its backward reduce-scatters, summing every rank's gradient).
            full = x
            if self.config.sequence_parallel:
                full = gather_from_sequence_parallel_region(x, group=self.tp_group)
            logits = torch.nn.functional.linear(full.mean(dim=0), self.weight.float(),
                                                self.bias.float())
            logits = logits.unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            # .float(): a bf16 wrapper (Float16Module) may have cast the parameters.
            logits = torch.nn.functional.linear(x, self.weight.float(), self.bias.float())
        scores = torch.softmax(logits.reshape(-1, self.num_experts), dim=-1)
        top, index = torch.topk(scores, self.topk, dim=-1)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(scores).scatter(1, index, top)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)
        return probs, routing_map


def router_spec(moe: MoEConfig):
    """The router builder MoELayer calls as `router(config=..., pg_collection=...)`."""
    if moe.router_type == "learned":
        return TopKRouter
    return functools.partial(ModalityRouter, granularity=moe.routing_granularity,
                             renormalize=moe.renormalize)
