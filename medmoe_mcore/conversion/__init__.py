"""HF <-> Megatron conversion: mapping kinds, one table per family, a key-checking engine."""
