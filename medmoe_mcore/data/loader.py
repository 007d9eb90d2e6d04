"""Encoded samples and deterministic global batches sharded by data-parallel rank.

Sample order: a fresh permutation per epoch from (seed, epoch); global batch g takes the
samples at positions [g*GB, (g+1)*GB) of that endless sequence and DP rank r the r-th slice.
The position is just `consumed_samples`, so a resumed run continues with the very next
sample: nothing repeated, nothing skipped."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.conventions import IGNORE_INDEX
from medmoe_mcore.data.encoding import encode
from medmoe_mcore.data.records import SkipRecord, read_shards, shard_paths
from medmoe_mcore.data.tokenizer import Tokenizer
from medmoe_mcore.data.images import load_image, preprocess


class EncodedDataset:
    """Every record of the shards, tokenised (images decoded lazily, per batch)."""

    def __init__(self, data_path, tokenizer, template: str, seq_length: int, cfg: ModelConfig):
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        v = cfg.vision
        if self.tok.vocab_size > cfg.language.vocab_size:
            raise ValueError(f"tokenizer {self.tok.path} has {self.tok.vocab_size} tokens; "
                             f"language.vocab_size={cfg.language.vocab_size} is smaller")
        if v is not None and self.tok.image_token_id != v.image_token_id:
            raise ValueError(f"tokenizer <image> id {self.tok.image_token_id} != "
                             f"vision.image_token_id={v.image_token_id} of the checkpoint")
        self.vision = v
        self.samples, self.skipped = [], Counter()
        num_patches = v.num_patches if v is not None else 1
        for record, image in read_shards(shard_paths(data_path)):
            try:
                ids, labels = encode(record, self.tok, template, seq_length, num_patches)
            except SkipRecord as e:
                self.skipped[e.reason] += 1
                continue
            self.samples.append((ids, labels, image, record.get("id")))
        if not self.samples:
            raise ValueError(f"{data_path}: no usable record (skipped {dict(self.skipped)})")
        self.template = template

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        skipped = f", skipped {dict(self.skipped)}" if self.skipped else ""
        return f"data: {len(self)} samples ({self.template} template){skipped}"

    def collate(self, indices) -> dict:
        rows = [self.samples[i] for i in indices]
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        images = []
        for b, (x, y, image, rid) in enumerate(rows):
            ids[b, : len(x)] = torch.tensor(x)
            labels[b, : len(y)] = torch.tensor(y)
            if self.vision is not None:  # decodable: validated when sharded
                images.append(preprocess(load_image(image, name=str(rid)), self.vision,
                                         train=True))
        return {"input_ids": ids, "labels": labels,
                "images": torch.stack(images) if images else None,
                "lengths": [len(r[0]) for r in rows]}


class Batches:
    """`shuffle=False` (validation): file order, wrapping around."""

    def __init__(self, data: EncodedDataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        self.data, self.gbs, self.mbs = data, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.data))
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch])
                            .permutation(len(self.data))}
        return int(self._orders[epoch][offset])

    def global_batch(self, consumed: int) -> list[dict]:
        """This rank's micro-batches of the global batch starting at `consumed`."""
        per_rank = self.gbs // self.dp_size
        start = consumed + self.dp_rank * per_rank
        positions = list(range(start, start + per_rank))
        return [self.data.collate([self.index(p) for p in positions[i:i + self.mbs]])
                for i in range(0, per_rank, self.mbs)]
