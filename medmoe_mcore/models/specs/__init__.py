"""Megatron-Core layer specs (ModuleSpec trees) of the Med-MoE language models."""
