"""medmoe-mcore: Med-MoE (arXiv 2404.10237) training on NVIDIA Megatron-Core."""

from medmoe_mcore.runtime import quiet as _quiet

_quiet.install()

__version__ = "0.1.0"
