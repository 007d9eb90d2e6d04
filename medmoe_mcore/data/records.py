"""LLaVA-format records: validation by reason, and webdataset tar shards (`{key}.json` +
`{key}.{ext}` image bytes) written with progress and a report. Never a crash, never silent:
every skipped record is counted under its reason and the first few are named."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from tqdm import tqdm

from medmoe_mcore.conventions import IMAGE_TOKEN
from medmoe_mcore.data.images import ImageDecodeError, load_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REASONS = ("malformed", "missing_image", "corrupt_image", "no_image_token", "empty_answer",
           "unknown_role", "not_utf8", "too_long")


class SkipRecord(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


def check(record: dict, image_bytes: Optional[bytes], max_chars: int) -> None:
    """Raise SkipRecord naming the first problem of a record."""
    if not isinstance(record, dict):
        raise SkipRecord("malformed", "not a JSON object")
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
    if ROLES[turns[0]["from"]] != "user" or IMAGE_TOKEN not in turns[0]["value"]:
        raise SkipRecord("no_image_token", "the first human turn has no <image>")
    if not any(ROLES[t["from"]] == "assistant" for t in turns):
        raise SkipRecord("empty_answer", "no answer turn")
    if total > max_chars:
        raise SkipRecord("too_long", f"{total} characters > {max_chars}")
    if image_bytes is None:
        raise SkipRecord("missing_image", str(record.get("image")))
    try:
        load_image(image_bytes, name=str(record.get("image")))
    except ImageDecodeError as e:
        raise SkipRecord("corrupt_image", str(e)) from None


@dataclass
class Report:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few record ids
    shards: list = field(default_factory=list)

    def skip(self, reason: str, record_id) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(str(record_id))

    def to_json(self) -> str:
        return json.dumps({"written": self.written, "skipped": dict(self.skipped),
                           "skipped_total": sum(self.skipped.values()),
                           "examples": self.examples, "shards": self.shards}, indent=2)


def write_shards(records: Iterable[dict], image_reader: Callable[[dict], Optional[bytes]],
                 out_dir, samples_per_shard: int = 1000, max_chars: int = 8000,
                 prefix: str = "shard", total: Optional[int] = None,
                 show_progress: bool = True) -> Report:
    """Validate and write records to `out_dir/{prefix}-000000.tar, ...` + `report.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, tar, count = Report(), None, 0
    for index, record in enumerate(tqdm(records, total=total, desc="records",
                                        disable=not show_progress)):
        rid = record.get("id", index) if isinstance(record, dict) else index
        try:
            image = image_reader(record) if isinstance(record, dict) else None
            check(record, image, max_chars)
        except SkipRecord as e:
            report.skip(e.reason, rid)
            continue
        if tar is None or count == samples_per_shard:
            if tar is not None:
                tar.close()
            name = f"{prefix}-{len(report.shards):06d}.tar"
            tar, count = tarfile.open(out_dir / name, "w"), 0
            report.shards.append(name)
        key = f"{report.written:09d}"
        ext = Path(str(record.get("image", "x.png"))).suffix.lstrip(".").lower() or "png"
        _add(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        _add(tar, f"{key}.{ext}", image)
        report.written += 1
        count += 1
    if tar is not None:
        tar.close()
    (out_dir / "report.json").write_text(report.to_json())
    return report


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_shards(paths: Iterable) -> Iterator[tuple[dict, bytes]]:
    """(record, image bytes) pairs from tar shards, in order."""
    for path in paths:
        with tarfile.open(path) as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = pending.setdefault(key, {})
                entry["json" if ext == "json" else "image"] = data
                if len(entry) == 2:
                    yield json.loads(pending.pop(key)["json"]), entry["image"]


def shard_paths(data_path) -> list[Path]:
    """A shard file, or every `*.tar` of a folder (sorted)."""
    path = Path(data_path)
    paths = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not paths or not all(p.exists() for p in paths):
        raise FileNotFoundError(f"--data-path {data_path}: no .tar shards")
    return paths


def load_json_records(path) -> list:
    """A LLaVA JSON list or JSONL file; text that is not valid UTF-8 survives as lone
    surrogates so that its record is reported (not_utf8) instead of failing the whole file."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
