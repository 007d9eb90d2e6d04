"""Training and validation micro-batches through megatron-energon: the datasets of
tools/prepare_data.py (or a blend of them, data/blend.py) streamed by worker processes that
tokenise with our templates and preprocess images; each data-parallel rank reads its own part
(energon's WorkerConfig), so memory does not grow with the data. The training loader's state
is saved and restored exactly (`state_bytes` / `restore_bytes`, kept per data-parallel rank in
our checkpoints).

Order: energon's shuffle (slices of `MAX_SAMPLES_PER_SEQUENCE` samples in a seeded order, then
a `SHUFFLE_BUFFER_SIZE` sample buffer, the values of Megatron-LM's multimodal example),
repeated endlessly; a blend draws from its datasets by weight. Validation reads in file order,
the same micro-batches every time.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from megatron.energon import (Cooker, DefaultTaskEncoder, SkipSample, WorkerConfig,
                              basic_sample_keys, get_loader, get_savable_loader, get_train_dataset,
                              get_val_dataset, stateless)
from megatron.energon.errors import log_exception

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conventions import IGNORE_INDEX
from medmoe_mcore.data import loader_state
from medmoe_mcore.data.blend import DataBlend
from medmoe_mcore.data.encoding import encode
from medmoe_mcore.data.images import load_image, preprocess
from medmoe_mcore.data.loader_process import LoaderProcess
from medmoe_mcore.data.packing import PACKING_BUFFER_SIZE, sequence_packs
from medmoe_mcore.data.records import SkipRecord
from medmoe_mcore.data.tokenizer import Tokenizer

SHUFFLE_BUFFER_SIZE = 100
MAX_SAMPLES_PER_SEQUENCE = 100
# A worker whose first this-many records were all skipped stops the run (energon would go on
# skipping forever): the records cannot fit, e.g. --seq-length below the image tokens.
GIVE_UP_AFTER_SKIPPING = 100
# the modality label of a record without an image (balanced batches, expert statistics)
TEXT_ONLY = "text-only"
# --balanced-modality-batches: micro-batches whose samples are regrouped by modality together
BALANCE_WINDOW = 8


def _on_error(error: Exception, sample, sources=None) -> None:
    """Energon's handler for an exception in a worker: ours (a run that cannot go on) stop the
    run; anything else is energon's default, the traceback with the sample's source printed
    and the sample left out."""
    if isinstance(error, ConfigError):
        raise error
    log_exception(error, sample, sources)


def _image_order(part: str) -> int:
    """`img3.png` -> 3 (a record of several images); a single image's part -> 0."""
    head = part.partition(".")[0]
    return int(head[3:]) if head.startswith("img") and head[3:].isdigit() else 0


@stateless
def _raw_record(sample: dict) -> dict:
    """A crude webdataset sample (`{key}.json` + its images' bytes: `{key}.{ext}`, or
    `{key}.img0.{ext}`, `{key}.img1.{ext}`, ... in <image> order) -> record + images."""
    parts = sorted((k for k in sample if not k.startswith("__") and k != "json"),
                   key=_image_order)
    return dict(**basic_sample_keys(sample), record=json.loads(sample["json"]),
                images=[sample[k] for k in parts])


def _check_packing(cfg: ModelConfig) -> None:
    """--pack-sequences needs attention that honours a sample mask and routing per token."""
    if cfg.moe is not None and cfg.moe.routing_granularity == "sample":
        raise ConfigError("--pack-sequences with --moe-routing-granularity sample: the sample "
                          "router pools over the whole row, which would mix the packed "
                          "samples; use token routing or leave packing off")
    if cfg.parallel.transformer_impl != "local":
        raise ConfigError(f"--pack-sequences with --transformer-impl "
                          f"{cfg.parallel.transformer_impl}: packed rows are masked per sample "
                          "in the local attention (SDPA with a block-diagonal mask); Transformer "
                          "Engine would need THD packed-sequence parameters, not built; use "
                          "--transformer-impl local")


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else -1


class MedMoETaskEncoder(DefaultTaskEncoder):
    """Records -> (ids, labels, image) with our templates, in the loader's workers; micro-
    batches padded, with each sample's dataset and the worker's running skip counts. With
    `pack_length`, each row of a micro-batch holds several samples (`sample_index` says whose
    each token is; data/packing.py chooses them)."""

    cookers = [Cooker(_raw_record)]
    decoder = None  # raw bytes: images are decoded by data/images.py (DICOM included)

    def __init__(self, tokenizer, template: str, seq_length: int, cfg: ModelConfig,
                 train: bool = True, balance_micro_batch: int = 0, pack: bool = False):
        super().__init__()
        # > 0: micro-batches of this size composed from the modality mix (select_samples_to_pack)
        self.balance_micro_batch = balance_micro_batch
        if pack:
            _check_packing(cfg)
        self.pack_length = seq_length if pack else 0
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        v = cfg.vision
        if tok.vocab_size > cfg.language.vocab_size:
            raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens; "
                              f"language.vocab_size={cfg.language.vocab_size} is smaller")
        if v is not None and tok.image_token_id != v.image_token_id:
            raise ConfigError(f"tokenizer <image> id {tok.image_token_id} != "
                              f"vision.image_token_id={v.image_token_id} of the checkpoint")
        self.tok, self.template, self.seq_length = tok, template, seq_length
        self.vision, self.train = v, train
        self.skipped = Counter()  # in this worker process
        self.encoded = 0

    @stateless  # deterministic (no random augmentation): energon may re-encode to restore
    def encode_sample(self, sample: dict) -> dict:
        record = sample["record"]
        patches = self.vision.num_patches if self.vision is not None else 1
        try:
            ids, labels = encode(record, self.tok, self.template, self.seq_length, patches)
        except SkipRecord as e:
            self.skipped[e.reason] += 1
            if not self.encoded and self.skipped.total() >= GIVE_UP_AFTER_SKIPPING:
                raise ConfigError(
                    f"the first {self.skipped.total()} records read were all skipped "
                    f"({dict(self.skipped)}); with --seq-length {self.seq_length} and "
                    f"{patches} image tokens per image, do they fit?") from None
            raise SkipSample() from None
        self.encoded += 1
        images = []
        if self.vision is not None:  # decodable: checked when the shards were written
            images = [preprocess(load_image(data, name=str(record.get("id"))), self.vision,
                                 train=self.train) for data in sample["images"]]
        sources = sample.get("__sources__") or ()
        # the sample-level modality: the record's, for all its images (text-only: none)
        return dict(**basic_sample_keys(sample), ids=ids, labels=labels, images=images,
                    dataset=str(sources[0].dataset_path) if sources else "",
                    modality=str(record.get("modality") or ("" if sample["images"]
                                                            else TEXT_ONLY)))

    def select_samples_to_pack(self, samples: list[dict]) -> list[list[dict]]:
        """Energon's packing stage: rows of packed samples (data/packing.py), or, used as a
        sampler, a window of BALANCE_WINDOW micro-batches' samples (in the epoch's shuffled
        order) regrouped into micro-batches that each carry the window's modality mix.
        Energon saves the buffer with the loader state, so a resume is exact."""
        if self.pack_length:
            patches = self.vision.num_patches if self.vision is not None else 1
            lengths = [len(s["ids"]) + len(s["images"]) * (patches - 1) for s in samples]
            return sequence_packs(samples, lengths, self.pack_length)
        return balanced_micro_batches(samples, self.balance_micro_batch)

    @stateless
    def pack_selected_samples(self, samples: list[dict]) -> dict:
        return dict(**basic_sample_keys(samples[0]), members=samples)

    def batch(self, samples: list[dict]) -> dict:
        if self.pack_length:  # each is a pack: one row of several samples
            rows = [pack["members"] for pack in samples]
        elif "members" in samples[0]:  # one balanced micro-batch
            rows = [[m] for pack in samples for m in pack["members"]]
        else:
            rows = [[s] for s in samples]
        lengths = [sum(len(m["ids"]) for m in row) for row in rows]
        ids = torch.full((len(rows), max(lengths)), self.tok.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        index = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            at = 0
            for i, m in enumerate(row):
                n = len(m["ids"])
                ids[r, at:at + n] = torch.tensor(m["ids"])
                labels[r, at:at + n] = torch.tensor(m["labels"])
                labels[r, at] = IGNORE_INDEX  # no token predicts a sample's first one
                index[r, at:at + n] = i
                at += n
            index[r, at:] = len(row)  # the padding: a segment of its own
        members = [m for row in rows for m in row]
        images = [image for m in members for image in m["images"]]  # in placeholder order
        batch = {"input_ids": ids, "labels": labels,
                 "images": torch.stack(images) if images else None,
                 "lengths": lengths, "samples": len(members),
                 "datasets": [m["dataset"] for m in members],
                 "modalities": [m["modality"] for m in members],
                 "skipped": (_worker_id(), dict(self.skipped))}
        if self.pack_length:
            batch["sample_index"] = index
        return batch

    def encode_batch(self, batch: dict) -> dict:
        return batch


def balanced_micro_batches(samples: list[dict], size: int) -> list[list[dict]]:
    """Micro-batches of `size` in which every modality is spread evenly: the j-th of a
    modality's n samples is placed at (j + 1/2) / n of the window (stratified order; ties in
    the order the modalities first appear), then the window is cut. No sample is dropped."""
    first_seen: dict = {}
    by_modality: dict = {}
    for sample in samples:
        first_seen.setdefault(sample["modality"], len(first_seen))
        by_modality.setdefault(sample["modality"], []).append(sample)
    keyed = [((j + 0.5) / len(group), first_seen[m], sample)
             for m, group in by_modality.items() for j, sample in enumerate(group)]
    ordered = [sample for _, _, sample in sorted(keyed, key=lambda k: k[:2])]
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _shut_down(loader) -> None:
    """Stop a loader's worker processes now and wait for its queue threads to end, so that
    no process or thread outlives the loader (torch's iterator has no public close)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        for queue in [*getattr(iterator, "_index_queues", []),
                      getattr(iterator, "_worker_result_queue", None)]:
            thread = getattr(queue, "_thread", None)
            if thread is not None:
                thread.join(timeout=10)
    loader._iterator = None
    if hasattr(loader, "_epoch_iterator"):
        loader._epoch_iterator = None


class _Batches:
    def __init__(self, blend: DataBlend, encoder: MedMoETaskEncoder, dp_rank: int,
                 dp_size: int, num_workers: int, seed: int):
        self.blend, self.encoder = blend, encoder
        # no data_parallel_group: the state is saved per rank (no gather), and the config
        # travels to the workers by pickle, which a process group does not survive
        self.worker_config = WorkerConfig(rank=dp_rank, world_size=dp_size,
                                          num_workers=num_workers, seed_offset=seed,
                                          global_error_handler=_on_error)
        self._skipped: dict[int, dict] = {}
        self._drawn = [0] * len(blend.datasets)

    def _take(self, batch: dict) -> dict:
        worker, counts = batch.pop("skipped")
        self._skipped[worker] = counts
        for path in batch["datasets"]:
            self._drawn[self.blend.index_of(path)] += 1
        return batch

    def read_per_dataset(self) -> list[int]:
        """Samples this rank read, per dataset of the blend, in this process's run."""
        return list(self._drawn)

    def skipped(self) -> Counter:
        """Records skipped while encoding (e.g. too long), by reason, in this process's run."""
        return sum((Counter(c) for c in self._skipped.values()), Counter())


class TrainingBatches(_Batches):
    """This data-parallel rank's micro-batches, endlessly."""

    def __init__(self, blend: DataBlend, encoder: MedMoETaskEncoder, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int, seed: int):
        super().__init__(blend, encoder, dp_rank, dp_size, num_workers, seed)
        batching = dict(batch_size=micro_batch_size)
        if encoder.balance_micro_batch:  # one pack of energon's = one balanced micro-batch
            batching = dict(batch_size=1,
                            packing_buffer_size=micro_batch_size * BALANCE_WINDOW)
        elif encoder.pack_length:  # one pack = one row
            batching = dict(batch_size=micro_batch_size, packing_buffer_size=PACKING_BUFFER_SIZE)
        dataset = get_train_dataset(blend.source, **batching,
                                    shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
                                    max_samples_per_sequence=MAX_SAMPLES_PER_SEQUENCE,
                                    task_encoder=encoder, worker_config=self.worker_config,
                                    repeat=True)
        self.loader = get_savable_loader(dataset)
        self._iter = None

    def next(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        return self._take(next(self._iter))

    def state_bytes(self) -> bytes:
        return loader_state.to_bytes(self.loader.save_state_rank())

    def restore_bytes(self, data: bytes, where: str) -> None:
        self.loader.restore_state_rank(loader_state.from_bytes(data, where))
        self._iter = None

    def close(self) -> None:
        _shut_down(self.loader)
        self._iter = None


class ValidationBatches(_Batches):
    """The first `n` micro-batches of this rank's part in file order, the same every call
    (repeating a part shorter than that)."""

    def __init__(self, blend: DataBlend, encoder: MedMoETaskEncoder, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int, seed: int):
        super().__init__(blend, encoder, dp_rank, dp_size, num_workers, seed)
        self.micro_batch_size = micro_batch_size

    def _loader(self):
        # a new one each pass: an energon loader goes on where its last iteration stopped
        return get_loader(get_val_dataset(
            self.blend.source, split_part="train", batch_size=self.micro_batch_size,
            task_encoder=self.encoder, worker_config=self.worker_config))

    def micro_batches(self, n: int) -> list[dict]:
        out: list[dict] = []
        loader = self._loader()
        try:
            for batch in loader:
                out.append(self._take(batch))
                if len(out) == n:
                    break
        finally:
            _shut_down(loader)
        if not out:
            raise ConfigError(f"{self.blend.flag}: no usable sample for data-parallel rank "
                              f"{self.worker_config.rank} (skipped {dict(self.skipped())})")
        return [out[i % len(out)] for i in range(n)]  # a short part repeats

    def close(self) -> None:
        pass  # each pass's loader is shut down at its end


def _in_process_or_helper(batches_class, args: tuple, num_workers: int, name: str):
    # with workers, energon forks: do that from a clean helper process (data/loader_process.py)
    return LoaderProcess(batches_class, args, name) if num_workers else batches_class(*args)


def training_batches(blend: DataBlend, encoder: MedMoETaskEncoder, micro_batch_size: int,
                     dp_rank: int, dp_size: int, num_workers: int, seed: int):
    """A TrainingBatches: in this process without workers, else in a helper process."""
    return _in_process_or_helper(
        TrainingBatches, (blend, encoder, micro_batch_size, dp_rank, dp_size, num_workers,
                          seed), num_workers, f"training (rank {dp_rank})")


def validation_batches(blend: DataBlend, encoder: MedMoETaskEncoder, micro_batch_size: int,
                       dp_rank: int, dp_size: int, num_workers: int, seed: int):
    """A ValidationBatches: in this process without workers, else in a helper process."""
    return _in_process_or_helper(
        ValidationBatches, (blend, encoder, micro_batch_size, dp_rank, dp_size, num_workers,
                            seed), num_workers, f"validation (rank {dp_rank})")
