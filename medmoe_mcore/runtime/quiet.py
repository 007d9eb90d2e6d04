"""Known, expected warnings of our dependencies, silenced by message so that the main job's
output shows its log lines (anything else still prints, once per place as Python does).
Installed on `import medmoe_mcore`; `initialize` says once (rank 0) what the first two mean."""

from __future__ import annotations

import warnings

KNOWN = (
    # Megatron-Core at import time, once per module, when TE / apex are absent (CPU boxes).
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"Transformer Engine is not installed", UserWarning),
    # Megatron-Core 0.16's TransformerConfig default (cuda_graph_scope), for every config built.
    (r"full scope is deprecated", UserWarning),
    # torch's distributed checkpoint API as Megatron's torch_dist strategy calls it (the CPU
    # runtime's TorchFunctionMode is where Python sees the call, hence `cpu.py` in the text).
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # megatron-energon's loaders ask for pinned memory, which a CPU box does not have.
    (r"'pin_memory' argument is set as true but no accelerator is found", UserWarning),
)


def install() -> None:
    for message, category in KNOWN:
        warnings.filterwarnings("ignore", message=f".*{message}.*", category=category)


def te_missing_note() -> str | None:
    """What rank 0 says once instead of the warnings above (None when TE is importable)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return ("[medmoe] Transformer Engine and apex are not installed: --transformer-impl "
                "local only (Megatron-Core's PyTorch modules and fallbacks)")
    return None
