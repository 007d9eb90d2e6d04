"""medmoe-mcore: Med-MoE (arXiv 2404.10237) training on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
