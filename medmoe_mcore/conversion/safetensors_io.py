"""Streaming safetensors I/O: zero-copy memory-mapped reads, sharded atomic writes."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medmoe_mcore.checkpoint.lock import refuse_if_held
from medmoe_mcore.config.fields import ConfigError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CorruptFile(ConfigError):
    """A safetensors file or index that cannot be what it claims (named, before any read)."""


# The format's own limit (the `safetensors` library refuses larger headers).
MAX_HEADER_BYTES = 100_000_000


def _parse_header(path: Path, f, size: int) -> tuple[dict, int]:
    """(header JSON object, data start), its length sane and its JSON's depth bounded."""
    head = f.read(8)
    if len(head) < 8:
        raise CorruptFile(f"{path}: truncated ({size} bytes, no safetensors header)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise CorruptFile(f"{path}: truncated or not safetensors (header of {header_len} bytes "
                          f"claimed, file is {size}, the format allows {MAX_HEADER_BYTES})")
    try:
        header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptFile(f"{path}: corrupt safetensors header ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + header_len


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, key: str, info) -> tuple[int, int]:
    """(start, end) of one tensor entry whose dtype, shape and byte length agree."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFile(f"{path}: tensor {key!r}: a header entry needs exactly dtype, shape "
                          f"and data_offsets, found {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise CorruptFile(f"{path}: tensor {key!r}: unknown dtype {dtype!r:.50} (known: "
                          f"{', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
        raise CorruptFile(f"{path}: tensor {key!r}: shape {shape!r:.200} is not a list of "
                          "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and offsets[0] <= offsets[1]):
        raise CorruptFile(f"{path}: tensor {key!r}: data_offsets {offsets!r:.200} are not "
                          "[start, end] with 0 <= start <= end")
    start, end = offsets
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - start != need:
        raise CorruptFile(f"{path}: tensor {key!r}: {dtype} {shape} needs {need} bytes, its "
                          f"data_offsets [{start}, {end}] hold {end - start}")
    return start, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data: int) -> None:
    """Tensors tile the data section exactly: no overlap, no hole, nothing past the end."""
    at, last = 0, None
    for start, end, key in sorted(spans):
        if start < at:
            raise CorruptFile(f"{path}: tensor {key!r} (bytes {start}-{end}) overlaps tensor "
                              f"{last!r} (which ends at byte {at})")
        if start > at:
            raise CorruptFile(f"{path}: bytes {at}-{start} of the data belong to no tensor "
                              f"(a hole before tensor {key!r})")
        at, last = end, key
    if at > data:
        raise CorruptFile(f"{path}: truncated: tensor {last!r} ends at byte {at} of the data, "
                          f"which has {data}")
    if at < data:
        raise CorruptFile(f"{path}: bytes {at}-{data} of the data belong to no tensor")


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data start) of one file, checked by the format's rules (those of the
    `safetensors` library, which reads it once more as a second opinion) and named here, file
    and tensor, instead of failing later in a reshape or silently aliasing two weights."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, base = _parse_header(path, f, size)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFile(f"{path}: __metadata__ must map strings to strings")
    spans = [(*_check_entry(path, key, info), key) for key, info in header.items()]
    _check_layout(path, spans, size - base)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise CorruptFile(f"{path}: refused by the safetensors library ({e})") from None
    return header, base


def read_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one small safetensors file (a projector, an adapter), checked first."""
    _read_header(Path(path))
    return load_file(str(path))


class SafetensorsDir:
    """All tensors of an HF folder (single file or index + shards), read lazily via mmap.

    `get` returns a tensor viewing the mapped file: nothing is copied until a transform needs to,
    so peak memory stays near one copy of what is being converted."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CorruptFile(f"{index}: unreadable index ({type(e).__name__}: {e})") \
                    from None
        elif (self.folder / SINGLE).exists():
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{self.folder}: neither {INDEX} nor {SINGLE} found")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        self._maps: dict[str, mmap.mmap] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise CorruptFile(f"{index}: names {name}, which is missing")
            header, base = _read_header(path)
            with open(path, "rb") as f:
                self._maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for key, info in header.items():
                if key in self._entries:
                    raise CorruptFile(f"{path}: tensor {key!r} also in {self._entries[key][0]}")
                self._entries[key] = (name, info, base)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def get(self, key: str) -> torch.Tensor:
        name, info, base = self._entries[key]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        buf = memoryview(self._maps[name])[base + start: base + end]
        with warnings.catch_warnings():  # read-only mapping: tensors are never written in place
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=dtype).view(info["shape"])

    def meta(self, key: str) -> torch.Tensor:
        """The tensor's shape and dtype on the meta device (nothing read)."""
        _, info, _ = self._entries[key]
        return torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: _DTYPES[info["dtype"]] for k, (_, info, _) in self._entries.items()}


def write_sharded(items: Iterable[tuple[str, torch.Tensor]], folder: str | os.PathLike,
                  max_shard_bytes: int = 2 << 30, progress=None) -> list[str]:
    """Write tensors as HF safetensors shards + index into `folder`, streaming: at most one
    shard is held in memory. Returns the tensor names written."""
    folder = Path(folder)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}
    total_size = total_parameters = 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"shard-{len(files):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view into a bigger tensor
            tensor = tensor.clone()
        shard[key] = tensor
        size += nbytes
        total_size, total_parameters = total_size + nbytes, total_parameters + tensor.numel()
        if progress:
            progress(key)
    flush()
    total = len(files)
    if total == 1:
        os.replace(folder / files[0][0], folder / SINGLE)
        return files[0][1]
    for n, (name, keys) in enumerate(files, start=1):
        final = f"model-{n:05d}-of-{total:05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({k: final for k in keys})
    # the index as transformers' save_pretrained writes it
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return sorted(weight_map)


class AtomicDir:
    """Write into `<target>.tmp-<pid>` and move it into place only when the block succeeds."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target)
        refuse_if_held(self.target)  # a training run's or another converter's folder
        self.tmp = self.target.with_name(f"{self.target.name}.tmp-{os.getpid()}")
        if self.target.exists() and any(self.target.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.target} exists and is not empty")
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():  # moved aside only once the new folder is complete
            aside = self.target.with_name(f"{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, aside)
            os.replace(self.tmp, self.target)
            shutil.rmtree(aside)
        else:
            os.replace(self.tmp, self.target)
        return False
