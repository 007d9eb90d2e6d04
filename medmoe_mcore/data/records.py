"""LLaVA-format records: validation by reason, and webdataset tar shards (`{key}.json` +
`{key}.{ext}` image bytes) written with progress and a report. Never a crash, never silent:
every skipped record is counted under its reason and the first few are named; no image
outside the image folder is ever opened; an output folder holding earlier work is replaced
only when asked, atomically; shards are read against the report's per-shard counts, so a
truncated or corrupt shard is named."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from tqdm import tqdm

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conventions import IMAGE_TOKEN
from medmoe_mcore.data import energon_format
from medmoe_mcore.data.record_images import dicom_records, extension, several_images
from medmoe_mcore.data.skips import REASONS, SkipRecord  # noqa: F401 (re-exported)
from medmoe_mcore.data.images import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError,
                                      is_dicom, load_image)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REPORT = "report.json"
DEFAULT_MAX_IMAGES = 4  # --max-images-per-sample


class ShardError(ConfigError):
    """A shard that cannot be read as written (truncated, corrupt, or not the report's)."""



def conversations(record: dict) -> list:
    """The turns; the authors' VQA files sometimes spell the key `conversatons`."""
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("malformed", "no conversations list")
    return turns


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipRecord("not_utf8", repr(text[:40])) from None


def check(record: dict, image_bytes, max_chars: int, max_pixels: int = DEFAULT_MAX_PIXELS,
          image_needed: bool = True, max_images: int = DEFAULT_MAX_IMAGES) -> None:
    """Raise SkipRecord naming the first problem of a record (its images too, unless
    `image_needed` is False: the text alone). `image_bytes`: one image's bytes, or a list in
    the order of the record's `images`."""
    if not isinstance(record, dict):
        raise SkipRecord("malformed", "not a JSON object")
    if "image" in record and not isinstance(record["image"], str):
        raise SkipRecord("malformed", "`image` must be one file name")
    names = image_names(record)  # "malformed" unless a list of file names
    turns = conversations(record)
    total = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipRecord("malformed", f"turn {i} has no text value")
        if turn.get("from") not in ROLES:
            raise SkipRecord("unknown_role", f"turn {i} from={turn.get('from')!r}")
        _utf8(turn["value"])
        total += len(turn["value"])
        if ROLES[turn["from"]] == "assistant" and not turn["value"].strip():
            raise SkipRecord("empty_answer", f"turn {i}")
    if ROLES[turns[0]["from"]] != "user":
        raise SkipRecord("unknown_role", "the first turn is not the user's")
    if not any(ROLES[t["from"]] == "assistant" for t in turns):
        raise SkipRecord("empty_answer", "no answer turn")
    placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    text_only = not names and not placeholders  # a text conversation
    if not text_only and IMAGE_TOKEN not in turns[0]["value"]:
        raise SkipRecord("no_image_token", "the record has an image and its first human turn "
                                           "no <image>")
    if not text_only and placeholders != len(names):
        raise SkipRecord("image_count_mismatch", f"{placeholders} {IMAGE_TOKEN} tokens for "
                                                 f"{len(names)} image(s)")
    if len(names) > max_images:
        raise SkipRecord("too_many_images", f"{len(names)} images, more than "
                                            f"--max-images-per-sample {max_images}")
    if total > max_chars:
        raise SkipRecord("too_long", f"{total} characters > {max_chars}")
    if not image_needed or text_only:
        return
    blobs = image_bytes if isinstance(image_bytes, list) else [image_bytes]
    for name, data in zip(names, blobs):
        if data is None:
            raise SkipRecord("missing_image", name)
        try:
            load_image(data, name=name, max_pixels=max_pixels)
        except ImageTooLargeError as e:
            raise SkipRecord("image_too_large", str(e)) from None
        except ImageDecodeError as e:
            raise SkipRecord("corrupt_image", str(e)) from None


def image_names(record: dict) -> list:
    """The file names of a record's images: `image` (one) or `images` (several, in the order
    of their <image> tokens); [] for a text-only record."""
    if "images" not in record:
        return [record["image"]] if "image" in record else []
    names = record["images"]
    if "image" in record or not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n for n in names):
        raise SkipRecord("malformed", "`images` must be a non-empty list of file names (and "
                                      "no `image` beside it)")
    return names


def folder_reader(folder) -> Callable[[dict], Optional[bytes]]:
    """A record's image bytes from `folder` (None when absent). A name that resolves outside
    the folder (`..`, an absolute path, a symlink leading out) is skipped as
    `path_outside_root` and never opened."""
    root = Path(folder).resolve()

    def read(record: dict) -> Optional[bytes]:
        name = record.get("image")
        if not isinstance(name, str) or not name:
            return None
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise SkipRecord("path_outside_root", name)
        return path.read_bytes() if path.is_file() else None

    return read


@dataclass
class Report:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few record ids
    shards: list = field(default_factory=list)  # [{"name", "records"}]
    dicom: Counter = field(default_factory=Counter)  # frames written, by data/dicom.py's HOW

    def skip(self, reason: str, record_id) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(str(record_id))

    def to_json(self) -> str:
        return json.dumps({"written": self.written, "skipped": dict(self.skipped),
                           "skipped_total": sum(self.skipped.values()),
                           "examples": self.examples, "shards": self.shards,
                           "dicom_frames_by_windowing": dict(self.dicom)}, indent=2)


def write_shards(records: Iterable[dict], image_reader: Callable[[dict], Optional[bytes]],
                 out_dir, samples_per_shard: int = 1000, max_chars: int = 8000,
                 prefix: str = "shard", total: Optional[int] = None,
                 show_progress: bool = True, overwrite: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, dicom_options=None,
                 max_images: int = DEFAULT_MAX_IMAGES) -> Report:
    """Validate and write records to `out_dir/{prefix}-000000.tar, ...` + `report.json`.
    DICOM images are stored as the PNG of each frame `dicom_options` asks for (data/dicom.py;
    several frames: one record each, ids `<id>#frame<N>`), counted in the report by how they
    were windowed.

    Written into a fresh sibling folder that replaces `out_dir` only when complete: a folder
    already holding files is refused unless `overwrite` (then replaced whole, never mixed)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds files (an earlier run's shards?); "
                              "choose another output folder or --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        report = _write(records, image_reader, work, samples_per_shard, max_chars, prefix,
                        total, show_progress, max_pixels, dicom_options, max_images)
        (work / REPORT).write_text(report.to_json())
        if report.shards:  # energon-ready: its index and a crude dataset description
            energon_format.write_meta(work, [s["name"] for s in report.shards])
        _replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _write(records, image_reader, folder: Path, samples_per_shard, max_chars, prefix, total,
           show_progress, max_pixels, dicom_options=None,
           max_images: int = DEFAULT_MAX_IMAGES) -> Report:
    report, tar = Report(), None
    for index, record in enumerate(tqdm(records, total=total, desc="records",
                                        disable=not show_progress)):
        rid = record.get("id", index) if isinstance(record, dict) else index
        try:
            several = isinstance(record, dict) and "images" in record
            names = image_names(record) if isinstance(record, dict) else []
            image = image_reader(record) if names and not several else None
            items = [(record, image, None)]
            if several:  # an `images` list: one record, each image as stored or a PNG
                check(record, None, max_chars, max_pixels, image_needed=False,
                      max_images=max_images)
                items = [several_images(record, names, image_reader, dicom_options,
                                        max_pixels)]
            elif image is not None and is_dicom(image):
                check(record, None, max_chars, max_pixels, image_needed=False,
                      max_images=max_images)
                items = dicom_records(record, image, dicom_options, max_pixels)
            for item, data, _ in items:
                check(item, data, max_chars, max_pixels, max_images=max_images)
        except SkipRecord as e:
            report.skip(e.reason, rid)
            continue
        for item, data, how in items:
            if tar is None or report.shards[-1]["records"] == samples_per_shard:
                if tar is not None:
                    tar.close()
                name = f"{prefix}-{len(report.shards):06d}.tar"
                tar = tarfile.open(folder / name, "w")
                report.shards.append({"name": name, "records": 0})
            key = f"{report.written:09d}"
            _add(tar, f"{key}.json", json.dumps(item, ensure_ascii=False).encode("utf-8"))
            if isinstance(data, list):  # {key}.img0.png, {key}.img1.jpg, ...
                for i, (name, blob) in enumerate(zip(item["images"], data)):
                    _add(tar, f"{key}.img{i}.{extension(name)}", blob)
            elif data is not None:  # a text-only record has the JSON alone
                _add(tar, f"{key}.{extension(item.get('image'))}", data)
            report.written += 1
            report.shards[-1]["records"] += 1
            for one in how if isinstance(how, list) else [how]:
                if one is not None:
                    report.dicom[one] += 1
    if tar is not None:
        tar.close()
    return report


def _replace(new: Path, out_dir: Path) -> None:
    """`new` takes `out_dir`'s place; the old folder goes only once the new one is there."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    new.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_shards(paths: Iterable) -> Iterator[tuple[dict, object]]:
    """(record, image bytes; a list for an `images` record; None for a text-only record)
    pairs from tar shards, in order. A shard that is truncated or
    corrupt, or holds another number of records than its folder's report.json says, stops
    the reading with a ShardError naming the file."""
    reports: dict[Path, dict] = {}  # one read of each folder's report, not one per shard
    for path in map(Path, paths):
        if path.parent not in reports:
            reports[path.parent] = expected_counts(path.parent)
        expected = reports[path.parent].get(path.name)
        count = 0
        try:
            with tarfile.open(path) as tar:
                # a sample's members are consecutive (JSON, then its image unless text-only)
                key, entry = None, {}
                for member in [*tar, None]:
                    name = member.name.partition(".") if member is not None else (None, "", "")
                    if entry and name[0] != key:
                        if "json" not in entry:
                            raise ShardError(f"{path}: sample {key} has no JSON record")
                        count += 1
                        record, images = json.loads(entry["json"]), entry.get("images", [])
                        yield record, images if "images" in record else \
                            (images[0] if images else None)
                        entry = {}
                    if member is None:
                        break
                    key, ext = name[0], name[2]
                    data = tar.extractfile(member).read()
                    if ext == "json":
                        entry["json"] = data
                    else:  # one image, or img0, img1, ... in order
                        entry.setdefault("images", []).append(data)
        except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: corrupt or truncated shard ({e})") from None
        if expected is not None and count != expected:
            raise ShardError(f"{path}: {count} records, but {path.parent / REPORT} says "
                             f"{expected} (a truncated shard?)")


def expected_counts(folder: Path) -> dict:
    report = folder / REPORT
    if not report.is_file():
        return {}
    shards = json.loads(report.read_text()).get("shards", [])
    return {s["name"]: s["records"] for s in shards if isinstance(s, dict)}


def shard_paths(data_path) -> list[Path]:
    """A shard file, or every `*.tar` of a folder (sorted); with a report.json, exactly the
    shards it lists (a stray or missing shard is refused by name)."""
    path = Path(data_path)
    paths = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not paths or not all(p.exists() for p in paths):
        raise FileNotFoundError(f"--data-path {data_path}: no .tar shards")
    if path.is_dir() and (path / energon_format.META / energon_format.DESCRIPTION).exists():
        energon_format.check_description(path)
    listed = expected_counts(path) if path.is_dir() else {}
    if listed and set(listed) != {p.name for p in paths}:
        extra = sorted({p.name for p in paths} - set(listed))
        missing = sorted(set(listed) - {p.name for p in paths})
        raise ShardError(f"{path}: shards do not match {REPORT} (not listed: {extra}; "
                         f"listed but absent: {missing})")
    return paths


def load_json_records(path) -> list:
    """A LLaVA JSON list (`[...]`) or JSON lines (one record per line). A file that is
    neither, or a `.json` holding a single object, is refused naming the file and the first
    bad line. Text that is not valid UTF-8 survives as lone surrogates so that its record is
    reported (not_utf8) instead of failing the whole file."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a valid JSON list (line {e.lineno}: {e.msg})") \
                from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix == ".json" and len(lines) == 1:
        raise ConfigError(f"{path}: a single JSON object, not a list of records (write `[...]`,"
                          " or one record per line in a .jsonl file)")
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: neither a JSON list nor JSON lines: line {n} is not "
                              f"JSON ({e.msg}): {line[:80]!r}") from None
    return records
