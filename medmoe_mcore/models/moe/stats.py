"""Which experts the tokens go to (paper Fig. 4-5): per MoE layer and expert, the routing
assignments counted by the record's modality and by token kind (image / text).

A forward hook on each MoE layer's router reads the routing map it returns (exactly top-k
experts per token), so the counts are the routing that ran, whatever the router: the frozen
modality router at token or sample granularity, or Megatron's learned TopKRouter. Each rank
counts the tokens it routed: with sequence parallelism a tensor-parallel rank holds a slice
of the positions, without it every tensor-parallel rank holds them all and only rank 0
counts. `reduce()` sums over the world, so the totals are those of the whole input, at any
TP/EP/DP. Padding is counted apart (its amount depends on how questions were batched);
every layer's total over experts is (routed tokens x top-k), padding included.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from medmoe_mcore.models.medmoe import token_kinds

KINDS = ("padding", "text", "image")  # index = models.medmoe.token_kinds' values


def moe_layers(model) -> list[BaseMoELayer]:
    return [m for m in model.modules() if isinstance(m, BaseMoELayer)]


class ExpertActivation:
    """Counts [layer, modality, kind, expert]; `begin_batch` before a forward says what each
    position of the batch is, `end_batch` after it (outside a batch, routing is not counted:
    decoding steps run through the same routers)."""

    def __init__(self, model, modalities: list[str]):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("expert statistics need an MoE model; this one has no MoE layer")
        self.model_config = model.model_config
        self.modalities = list(modalities)
        experts = self.layers[0].config.num_moe_experts
        dev = next(model.parameters()).device
        self.counts = torch.zeros(len(self.layers), len(self.modalities), len(KINDS), experts,
                                  dtype=torch.long, device=dev)
        self._batch = None
        self._handles = [layer.router.register_forward_hook(self._hook(i))
                         for i, layer in enumerate(self.layers)]

    @property
    def expert_names(self) -> list[str] | None:
        """The modality router's class of each expert (its file's names), if known."""
        moe = self.model_config.moe
        return [str(n) for n in moe.modalities] if moe is not None and moe.modalities else None

    @property
    def layer_numbers(self) -> list[int]:
        return [int(layer.layer_number) for layer in self.layers]

    def begin_batch(self, input_ids: torch.Tensor, lengths, modalities: list[str],
                    pad_to_multiple: int = 1) -> None:
        """input_ids [b, s] as given to the model; lengths: each sample's real ids (the rest
        is padding); modalities: each sample's, one of `self.modalities`; pad_to_multiple:
        the model's (splice_images)."""
        vision = self.model_config.vision
        kinds = token_kinds(input_ids.cpu(), lengths,
                            vision.image_token_id if vision else -1,  # text-only: no image
                            vision.num_patches if vision else 0, pad_to_multiple)
        modality = torch.tensor([self.modalities.index(m) for m in modalities])
        cell = modality.unsqueeze(0) * len(KINDS) + kinds  # [S, b]
        self._batch = cell.to(self.counts.device)

    def end_batch(self) -> None:
        self._batch = None

    def _hook(self, index: int):
        def count(router, inputs, output):
            if self._batch is None:
                return
            routing_map = output[1]  # [tokens, experts], tokens in order s * b + batch
            local = inputs[0].shape[0]
            cells = self._batch
            if local != cells.shape[0]:  # sequence parallel: this rank's slice
                tp_rank = parallel_state.get_tensor_model_parallel_rank()
                cells = cells[tp_rank * local:(tp_rank + 1) * local]
            elif parallel_state.get_tensor_model_parallel_rank() != 0:
                return  # the same tokens as tensor-parallel rank 0
            table = self.counts[index].view(-1, self.counts.shape[-1])
            table.index_add_(0, cells.reshape(-1), routing_map.long())
        return count

    def reduce(self) -> torch.Tensor:
        """The world's counts (a collective: every rank calls it), on the CPU."""
        total = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        return total.cpu()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def rows(self, counts: torch.Tensor) -> list[dict]:
        """One row per layer x modality x kind x expert: count and share (of that layer,
        modality and kind's assignments)."""
        out, names = [], self.expert_names or [""] * counts.shape[-1]
        for li, layer in enumerate(self.layer_numbers):
            for mi, modality in enumerate(self.modalities):
                for ki, kind in enumerate(KINDS):
                    total = int(counts[li, mi, ki].sum())
                    for e, n in enumerate(counts[li, mi, ki].tolist()):
                        if total:
                            out.append({"layer": layer, "modality": modality,
                                        "tokens": kind, "expert": e, "expert_name": names[e],
                                        "count": n, "share": round(n / total, 6)})
        return out

    def write_csv(self, counts: torch.Tensor, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["layer", "modality", "tokens", "expert",
                                                   "expert_name", "count", "share"])
            writer.writeheader()
            writer.writerows(self.rows(counts))
        return path


def shares(counts: torch.Tensor) -> torch.Tensor:
    """[layer, modality, expert] share of the real (image + text) assignments; NaN where a
    modality has no token."""
    real = counts[:, :, 1:].sum(dim=2).double()
    return real / real.sum(dim=-1, keepdim=True)


def load_per_layer(counts: torch.Tensor) -> torch.Tensor:
    """[layer, expert] share of the real assignments over every modality (the training log's
    expert load)."""
    real = counts[:, :, 1:].sum(dim=(1, 2)).double()
    return real / real.sum(dim=-1, keepdim=True).clamp(min=1)
