"""Data: real offline medical images, dataset preparation, tokenisation and batching."""
