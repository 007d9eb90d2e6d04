"""Training batches through megatron-energon: shards of tools/prepare_data.py (energon
datasets, data/energon_format.py) streamed by worker processes that tokenise with our
templates and preprocess images, one loader per data-parallel rank, its state saved and
restored exactly (`state()` / `restore()`).

Work in progress (issue 13): not yet used by the trainer.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from megatron.energon import (Cooker, DefaultTaskEncoder, SkipSample, WorkerConfig,
                              basic_sample_keys, get_savable_loader, get_train_dataset,
                              stateless)

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.conventions import IGNORE_INDEX
from medmoe_mcore.data.encoding import encode
from medmoe_mcore.data.images import load_image, preprocess
from medmoe_mcore.data.records import SkipRecord, shard_paths
from medmoe_mcore.data.tokenizer import Tokenizer


@stateless
def _raw_record(sample: dict) -> dict:
    """A crude webdataset sample (`{key}.json` + `{key}.{ext}` bytes) -> record + image."""
    image = next((v for k, v in sample.items() if not k.startswith("__") and k != "json"),
                 None)
    return dict(**basic_sample_keys(sample), record=json.loads(sample["json"]), image=image)


class MedMoETaskEncoder(DefaultTaskEncoder):
    """Records -> (ids, labels, image) with our templates, in the loader's workers; micro-
    batches padded like the in-memory loader's."""

    cookers = [Cooker(_raw_record)]
    decoder = None  # raw bytes: images are decoded by data/images.py (DICOM included)

    def __init__(self, tok: Tokenizer, template: str, seq_length: int, cfg: ModelConfig):
        super().__init__()
        self.tok, self.template, self.seq_length = tok, template, seq_length
        self.vision = cfg.vision
        self.skipped = Counter()  # per worker process

    def encode_sample(self, sample: dict) -> dict:
        record = sample["record"]
        patches = self.vision.num_patches if self.vision is not None else 1
        try:
            ids, labels = encode(record, self.tok, self.template, self.seq_length, patches)
        except SkipRecord as e:
            self.skipped[e.reason] += 1
            raise SkipSample() from None
        image = None
        if self.vision is not None:
            image = preprocess(load_image(sample["image"], name=str(record.get("id"))),
                               self.vision, train=True)
        return dict(**basic_sample_keys(sample), ids=ids, labels=labels, image=image,
                    modality=str(record.get("modality") or "-"))

    def batch(self, samples: list[dict]) -> dict:
        length = max(len(s["ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, :len(s["ids"])] = torch.tensor(s["ids"])
            labels[b, :len(s["labels"])] = torch.tensor(s["labels"])
        images = [s["image"] for s in samples if s["image"] is not None]
        return {"input_ids": ids, "labels": labels,
                "images": torch.stack(images) if images else None,
                "lengths": [len(s["ids"]) for s in samples],
                "modalities": [s["modality"] for s in samples]}

    def encode_batch(self, batch: dict) -> dict:
        return batch


class EnergonBatches:
    """This data-parallel rank's micro-batches, endlessly (energon repeats the data)."""

    def __init__(self, data_path, encoder: MedMoETaskEncoder, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int, seed: int, dp_group=None):
        shard_paths(data_path)  # counts, strays, trusted description: before anything runs
        self.worker_config = WorkerConfig(rank=dp_rank, world_size=dp_size,
                                          num_workers=num_workers, seed_offset=seed,
                                          data_parallel_group=dp_group)
        dataset = get_train_dataset(str(data_path), batch_size=micro_batch_size,
                                    shuffle_buffer_size=None, max_samples_per_sequence=None,
                                    task_encoder=encoder, worker_config=self.worker_config,
                                    repeat=True)
        self.loader = get_savable_loader(dataset)
        self._iter = None

    def next(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def state(self):
        return self.loader.save_state_rank()

    def restore(self, state) -> None:
        self.loader.restore_state_rank(state)
        self._iter = None
