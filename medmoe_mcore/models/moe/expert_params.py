"""One pass after the model is built: expert parameters get the gradient tags Megatron's
finalize_model_grads reads, whatever backend built them (local or Transformer Engine).

Expert weights belong to the expert-data-parallel group, whatever EP is. Megatron tags them
`allreduce=False` only when EP > 1; with EP = 1 and expert TP < attention TP they would be
reduced over the (smaller) dense data-parallel group and miss the tokens the other TP ranks
routed. And a row-parallel bias inherits the `sequence_parallel` tag, which makes
finalize_model_grads sum it across the attention TP group, i.e. across ranks that hold other
experts. Router and meta expert are not experts here: they are replicated like dense weights.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer


def tag_expert_parameters(model: torch.nn.Module) -> list[str]:
    """Tag every routed expert's parameters; returns their names (empty for a dense model)."""
    tagged = []
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            for name, param in module.experts.named_parameters():
                param.allreduce = False
                param.sequence_parallel = False
                tagged.append(f"{prefix}.experts.{name}")
    return tagged
