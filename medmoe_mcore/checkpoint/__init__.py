"""Checkpoints on disk: atomic saves in Megatron-LM's layout and what a folder holds (store.py),
the size and SHA-256 record verified before every load (integrity.py)."""
