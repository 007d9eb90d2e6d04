"""Shard folders in megatron-energon's dataset format: the `.nv-meta/` that `energon prepare`
writes (tar index, sample counts, split), written through energon's own API, and a crude
dataset description (`CrudeWebdataset`: samples stay raw, our task encoder turns them into
training samples). A dataset description can name Python classes and sample-loader files;
reading one from a folder we did not write must never run its code, so anything but
energon's own classes and ours is refused.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml

from medmoe_mcore.config.fields import ConfigError

META = ".nv-meta"
DESCRIPTION = "dataset.yaml"
# The modules a dataset description may name: energon's and ours, never the folder's own code.
TRUSTED_MODULES = ("megatron.energon", "medmoe_mcore")
CRUDE = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}


def write_meta(folder, shard_names: list[str]) -> None:
    """Index the shards and describe the folder as one crude `train` split (energon's own
    preparation code, no interaction)."""
    from megatron.energon.flavors import BaseWebdatasetFactory

    folder = Path(folder)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines name temp folders
        BaseWebdatasetFactory.prepare_dataset(folder, list(shard_names),
                                              split_parts_ratio=[("train", 1.0)],
                                              shuffle_seed=None, workers=1)
    (folder / META / DESCRIPTION).write_text(yaml.safe_dump(CRUDE, sort_keys=False))


def check_description(folder) -> dict:
    """The folder's dataset description, refused (naming file and key) when it names code
    outside energon and medmoe_mcore, or a sample loader / part filter (a .py file beside
    the data)."""
    path = Path(folder) / META / DESCRIPTION
    try:
        description = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable dataset description ({e})") from None
    problems = list(untrusted(description, "")) if isinstance(description, dict) else \
        ["(top level): not a mapping"]
    if problems:
        raise ConfigError(f"{path}: refused, it would run code from outside energon and "
                          f"medmoe_mcore: {'; '.join(problems)}")
    return description


def untrusted(node, where: str):
    """Each `key: value` of a description or metadataset that would run foreign code."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "__module__" and not _trusted(str(value)):
                yield f"{here}: {value!r}"
            elif key in ("sample_loader", "part_filter", "__function__"):
                yield f"{here}: {value!r}"
            else:
                yield from untrusted(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from untrusted(value, f"{where}[{i}]")


def _trusted(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in TRUSTED_MODULES)
