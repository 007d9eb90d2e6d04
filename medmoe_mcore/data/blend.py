"""What `--data-path` (and `--valid-data-path`) name, resolved and checked before anything is
built: one dataset folder of tools/prepare_data.py, Megatron-LM's weighted list
(`0.5 vqa_rad 0.3 slake 0.2 pathvqa`), or a megatron-energon metadataset YAML. Every dataset
folder it reaches is checked (trusted description, complete shards) and counted from its
index, so a bad folder fails naming itself before the model exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.data import energon_format
from medmoe_mcore.data.records import REPORT, ShardError, expected_counts, shard_paths

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Dataset:
    path: Path
    weight: Optional[float]  # normalised; None where energon's YAML decides (or one folder)
    samples: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class DataBlend:
    source: object  # what energon loads: a folder, a metadataset YAML, or a metadataset dict
    datasets: tuple[Dataset, ...]
    flag: str

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.datasets)

    def summary(self) -> str:
        if len(self.datasets) == 1 and not isinstance(self.source, (dict, Path)):
            return f"{self.samples} samples ({self.datasets[0].path})"
        parts = [f"{d.name} {d.samples} samples"
                 + (f" (weight {d.weight:.3g})" if d.weight is not None else "")
                 for d in self.datasets]
        return f"{self.samples} samples in a blend of {len(self.datasets)}: " + \
            "; ".join(parts)

    def index_of(self, dataset_path) -> int:
        """The position of a sample's dataset (energon's `__sources__` path)."""
        resolved = Path(str(dataset_path)).resolve()
        for i, d in enumerate(self.datasets):
            if d.path == resolved:
                return i
        raise KeyError(f"{dataset_path}: not a dataset of {self.flag}")

    def identity(self) -> list:
        """What a resumed run must read the same way (compared with the checkpoint's)."""
        return [[str(d.path), d.weight] for d in self.datasets]


def data_blend(value, flag: str = "--data-path") -> DataBlend:
    values = [value] if isinstance(value, (str, Path)) else list(value)
    if len(values) == 1:
        path = Path(values[0]).resolve()
        if path.is_file() and path.suffix in YAML_SUFFIXES:
            return DataBlend(path, tuple(_metadataset_leaves(path, flag)), flag)
        return DataBlend(str(path), (_dataset(path, None, flag),), flag)
    return _weighted_list(values, flag)


def _weighted_list(values: Sequence, flag: str) -> DataBlend:
    """Megatron-LM's `W1 PATH1 W2 PATH2 ...`; weights are relative (normalised here)."""
    if len(values) % 2:
        raise ConfigError(f"{flag} {' '.join(map(str, values))}: a blend is pairs of weight "
                          "and folder (`0.75 a 0.25 b`); got an odd number of values")
    pairs = []
    for weight, folder in zip(values[::2], values[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} is not a weight (a blend is pairs of weight "
                              "and folder: `0.75 a 0.25 b`)") from None
        if not w > 0:
            raise ConfigError(f"{flag}: weight {weight} of {folder} must be positive")
        pairs.append((w, Path(folder).resolve()))
    if len({p for _, p in pairs}) < len(pairs):
        raise ConfigError(f"{flag}: a folder appears twice in the blend (add the weights)")
    total = sum(w for w, _ in pairs)
    datasets = tuple(_dataset(p, w / total, flag) for w, p in pairs)
    config = {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
              "splits": {"train": {"blend": [{"weight": d.weight, "path": str(d.path)}
                                             for d in datasets]}}}
    return DataBlend(config, datasets, flag)


def _dataset(path: Path, weight, flag: str) -> Dataset:
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: not a dataset folder (the output folder of "
                          "tools/prepare_data.py)")
    counts = check_dataset(path)
    return Dataset(path, weight, sum(counts.values()))


def check_dataset(folder) -> dict[str, int]:
    """Records per shard of a prepared folder, from energon's index, after checking what is
    cheap to check before training: a trusted description, the shards of report.json and no
    others (records.shard_paths), index counts equal to the report's, and each shard at least
    as long as its index says (a copy cut short is refused naming the file)."""
    folder = Path(folder)
    info = folder / energon_format.META / ".info.json"
    if not info.is_file():
        raise ConfigError(f"{folder}: not an energon dataset (no {energon_format.META}/"
                          ".info.json); prepare it with tools/prepare_data.py")
    energon_format.check_description(folder)
    shards = shard_paths(folder)
    counts = json.loads(info.read_text()).get("shard_counts", {})
    listed = expected_counts(folder)
    for shard in shards:
        count = counts.get(shard.name)
        if count is None:
            raise ShardError(f"{shard}: not in the index {info}")
        if shard.name in listed and listed[shard.name] != count:
            raise ShardError(f"{shard}: {REPORT} says {listed[shard.name]} records, the index "
                             f"{count}")
        offsets = np.fromfile(f"{shard}.idx", dtype="<u8") \
            if Path(f"{shard}.idx").is_file() else None
        if offsets is None or len(offsets) != count + 1:
            raise ShardError(f"{shard}: its index {shard.name}.idx is missing or does not hold "
                             f"{count} records")
        if shard.stat().st_size < int(offsets[-1]):
            raise ShardError(f"{shard}: truncated ({shard.stat().st_size} bytes; its {count} "
                             f"records end at byte {int(offsets[-1])})")
    return {s.name: counts[s.name] for s in shards}


def _metadataset_leaves(path: Path, flag: str, seen: tuple = ()) -> list[Dataset]:
    """Every dataset folder an energon metadataset YAML reaches (nested YAMLs followed), after
    refusing any class that is not energon's or ours: reading it must run no foreign code."""
    if path in seen:
        raise ConfigError(f"{flag} {path}: the metadataset includes itself")
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{flag} {path}: not a readable metadataset YAML ({e})") from None
    problems = list(energon_format.untrusted(tree, ""))
    if problems:
        raise ConfigError(f"{flag} {path}: refused, it would run code from outside energon and "
                          f"medmoe_mcore: {'; '.join(problems)}")
    leaves = []
    for node in _with_path(tree):
        target = (path.parent / str(node["path"])).resolve()
        if target.is_file() and target.suffix in YAML_SUFFIXES:
            leaves += _metadataset_leaves(target, flag, seen + (path,))
        elif target not in [d.path for d in leaves]:
            leaves.append(_dataset(target, None, flag))
    if not leaves:
        raise ConfigError(f"{flag} {path}: the metadataset names no dataset (`path:` entries)")
    return leaves


def _with_path(node):
    if isinstance(node, dict):
        if "path" in node:
            yield node
        for key, value in node.items():
            if key != "path":
                yield from _with_path(value)
    elif isinstance(node, list):
        for value in node:
            yield from _with_path(value)
