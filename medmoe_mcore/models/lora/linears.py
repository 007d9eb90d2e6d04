"""Megatron's parallel linears with a LoRA adapter inside, and the spec entry that puts one in
a layer slot. The base layer keeps its parameter names (`weight`, `bias`), so every checkpoint
key, conversion table entry and expert tag of the base model stays as it is; the adapter adds
`lora.a` and `lora.b`, sharded in the distributed checkpoint like the base weight's matching
axis (column: B along the output rows, row: A along the input columns; gated fc1: B's gate
and up halves each split over TP, as Megatron stores the weight), so that adapters reload at
any TP/EP like everything else.
"""

from __future__ import annotations

import hashlib

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.models.lora.adapter import LoRAAdapter
from medmoe_mcore.models.specs.layers import ExpertRowParallelLinear


class _WithLoRA:
    """Mixin: output of the base linear + the adapter's addition, for the same input."""

    def __init__(self, *args, lora: LoRAConfig, gated: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = LoRAAdapter(self, lora.rank, lora.alpha, lora.dropout)
        self.lora_gated = gated  # the fc1 of a gated (SwiGLU) FFN: rows are [gate; up]

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return output + self.lora(input_).to(output.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {"lora.b": 0} if self.lora.kind == "column" else {"lora.a": 1}
        adapters = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items()
                    if k.startswith("lora.")}
        state.update(make_sharded_tensors_for_checkpoint(
            adapters, prefix, axis, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"]))
        if self.lora_gated:
            key = f"{prefix}lora.b"
            state[key] = apply_swiglu_sharded_factory(
                state[key], sharded_offsets, (metadata or {}).get("singleton_local_shards",
                                                                  False))
        return state

    def delta_weight(self) -> torch.Tensor:
        return self.lora.delta_weight().to(self.weight.dtype)


class LoRAColumnParallelLinear(_WithLoRA, ColumnParallelLinear):
    pass


class LoRARowParallelLinear(_WithLoRA, RowParallelLinear):
    pass


class LoRAExpertRowParallelLinear(_WithLoRA, ExpertRowParallelLinear):
    pass


LORA_LINEARS = {"column": LoRAColumnParallelLinear, "row": LoRARowParallelLinear,
                "expert_row": LoRAExpertRowParallelLinear}


def slot(linear, lora: LoRAConfig | None, target: str, kind: str, gated: bool = False):
    """A layer slot's entry: the backend's `linear`, or, when `target` is adapted, the local
    Megatron linear of that `kind` with an adapter (LoRA always wraps Megatron's own linears,
    whatever the backend: their names and sharding are the checkpoint's)."""
    if lora is None or target not in lora.target_modules:
        return linear
    return ModuleSpec(module=LORA_LINEARS[kind], params={"lora": lora, "gated": gated})


def adapted_layers(model: torch.nn.Module) -> dict[str, _WithLoRA]:
    """name -> every linear of `model` that carries an adapter."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _WithLoRA)}


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local expert prefix -> the same prefix with the global expert index (EP-independent)."""
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            for j, g in enumerate(module.local_expert_indices):
                names[f"{prefix}.experts.local_experts.{j}."] = \
                    f"{prefix}.experts.local_experts.{g}."
    return names


def initialize_adapters(model: torch.nn.Module, seed: int) -> int:
    """Draw every adapter's A from `seed` and the layer's layout-independent name (global
    expert index), so TP/EP layouts start from the same adapters; B = 0. Returns the count."""
    renames = _global_names(model)
    layers = adapted_layers(model)
    for name, layer in layers.items():
        key = name + "."
        for local, glob in renames.items():
            if key.startswith(local):
                key = glob + key[len(local):]
                break
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        layer.lora.reset(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return len(layers)


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight (W + alpha/r B A,
    in the weight's dtype) and no adapter keys: the state of the same model without LoRA, at
    this rank's layout."""
    deltas = {f"{name}.weight": layer.delta_weight()
              for name, layer in adapted_layers(model).items()}
    state = {}
    for key, value in model.state_dict().items():
        if ".lora." in key:
            continue
        state[key] = value + deltas[key] if key in deltas else value
    return state
