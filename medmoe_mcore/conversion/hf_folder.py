"""The HF folders an import reads, as users have them: a plain folder, a Hugging Face cache
entry (`models--org--name`, or one of its `snapshots/<revision>` folders, whose files are links
into the entry's `blobs/`), with `*.safetensors` weights or `pytorch_model*.bin` ones.

`.bin` files are pickles: they are read with `torch.load(weights_only=True)` (tensors and plain
containers only), so a file whose pickle needs anything else is refused naming it, and nothing
in it runs. A link that leads outside the cache entry is refused: nothing outside the given
folder is read."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from medmoe_mcore.conversion.safetensors_io import INDEX, SINGLE, CorruptFile, SafetensorsDir

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def resolve(folder: str | os.PathLike) -> Path:
    """The folder holding config.json and the weights: `folder` itself, or the snapshot a
    cache entry's `refs/main` names (its only snapshot when there is no ref)."""
    folder = Path(folder)
    snapshots = folder / "snapshots"
    if not (folder / "config.json").exists() and snapshots.is_dir():
        ref = folder / "refs" / "main"
        revisions = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        if ref.is_file():
            chosen = ref.read_text().strip()
        elif len(revisions) == 1:
            chosen = revisions[0]
        else:
            raise FileNotFoundError(f"{folder}: a Hugging Face cache entry without refs/main "
                                    f"and with snapshots {revisions}: pass the snapshot folder")
        if chosen not in revisions:
            raise FileNotFoundError(f"{ref}: names snapshot {chosen!r}, which {snapshots} "
                                    f"does not hold (it holds {revisions})")
        folder = snapshots / chosen
    _check_links(folder)
    return folder


def _check_links(folder: Path) -> None:
    """Files that are links (a cache snapshot's) must stay inside the cache entry."""
    links = [p for p in folder.iterdir() if p.is_symlink()]
    if not links:
        return
    entry = folder.parent.parent.resolve() if folder.parent.name == "snapshots" else \
        folder.resolve()
    for link in links:
        target = link.resolve()
        if entry not in target.parents:
            raise CorruptFile(f"{link}: a link to {target}, outside {entry}: refused (only a "
                              "cache snapshot's links into its own blobs/ are followed)")


class TorchBinDir:
    """`pytorch_model*.bin` weights with SafetensorsDir's interface, each file read once with
    `torch.load(weights_only=True, mmap=True)` (memory-mapped where the file is a zip archive,
    as every torch.save since 1.6 writes)."""

    def __init__(self, folder: Path):
        index = folder / BIN_INDEX
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CorruptFile(f"{index}: unreadable index ({type(e).__name__}: {e})") \
                    from None
        else:
            files = [BIN_SINGLE]
        self._tensors: dict[str, torch.Tensor] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise CorruptFile(f"{index}: names {name}, which is missing")
            for key, tensor in _load_bin(path).items():
                if key in self._tensors:
                    raise CorruptFile(f"{path}: tensor {key!r} is in another file too")
                self._tensors[key] = tensor

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def meta(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: t.dtype for k, t in self._tensors.items()}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(True)
        except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = load(False)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else "unsafe pickle"
        raise CorruptFile(f"{path}: refused: its pickle needs more than tensors and plain "
                          f"containers ({reason}); nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptFile(f"{path}: cannot read it as PyTorch weights ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptFile(f"{path}: not a state dict (names to tensors)")
    return state


def open_weights(folder: str | os.PathLike):
    """The weights of an HF folder: safetensors (preferred when both are there) or .bin."""
    folder = Path(folder)
    if (folder / INDEX).exists() or (folder / SINGLE).exists():
        return SafetensorsDir(folder)
    if (folder / BIN_INDEX).exists() or (folder / BIN_SINGLE).exists():
        return TorchBinDir(folder)
    raise FileNotFoundError(f"{folder}: no weights ({INDEX}, {SINGLE}, {BIN_INDEX} or "
                            f"{BIN_SINGLE})")
