"""tools/prepare_data.py as a user runs it: bad records counted by reason, MedMNIST."""

import io
import json

import numpy as np

from medmoe_mcore.data.medical_images import BY_NAME
from medmoe_mcore.data.records import read_shards, shard_paths
from tests.conftest import run_tool


def _png(name, size=40):
    image = BY_NAME[name].load()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _conv(q, a, role="gpt"):
    return [{"from": "human", "value": q}, {"from": role, "value": a}]


def mixed_records(folder):
    """Good records plus one of each bad kind; returns the JSON path."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "xray.png").write_bytes(_png("RG1_UNCI"))
    (folder / "images" / "ihc.png").write_bytes(_png("immunohistochemistry"))
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = [{"id": f"g{i}", "image": "xray.png" if i % 2 else "ihc.png",
             "conversations": _conv("<image>\nWhat modality?", "An X-ray.")} for i in range(6)]
    good.append({"id": "typo", "image": "ihc.png",  # the authors' misspelt key
                 "conversatons": _conv("<image>\nWhat stain?", "IHC.")})
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "corrupt", "image": "broken.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "noimg", "image": "xray.png", "conversations": _conv("What is it?", "A.")},
        {"id": "empty", "image": "xray.png", "conversations": _conv("<image>\nQ?", "  ")},
        {"id": "role", "image": "xray.png", "conversations": _conv("<image>\nQ?", "A.", "bot")},
        {"id": "long", "image": "xray.png", "conversations": _conv("<image>\n" + "x" * 500,
                                                                   "A.")},
        {"id": "malformed", "image": "xray.png"},
    ]
    text = json.dumps(good + bad)
    # A record whose text is not valid UTF-8 (raw byte 0xff inside its answer).
    text = text[:-1] + ', {"id": "latin1", "image": "xray.png", "conversations": ' \
        '[{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "caf__"}]}]'
    raw = text.encode("utf-8").replace(b"caf__", b"caf\xe9")
    (folder / "data.json").write_bytes(raw)
    return folder / "data.json"


def test_prepare_data_counts_each_bad_kind(tmp_path):
    path = mixed_records(tmp_path / "src")
    r = run_tool("tools/prepare_data.py", "--json", str(path), "--image-folder",
                 str(tmp_path / "src" / "images"), "--output", str(tmp_path / "shards"),
                 "--samples-per-shard", "3", "--max-chars", "200", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "shards" / "report.json").read_text())
    assert report["written"] == 7 and len(report["shards"]) == 3
    assert report["skipped"] == {k: 1 for k in ("missing_image", "corrupt_image",
                                                "no_image_token", "empty_answer",
                                                "unknown_role", "too_long", "malformed",
                                                "not_utf8")}
    assert report["examples"]["corrupt_image"] == ["corrupt"]
    records = [rec for rec, _ in read_shards(shard_paths(tmp_path / "shards"))]
    assert [rec["id"] for rec in records] == [f"g{i}" for i in range(6)] + ["typo"]


def test_medmnist_to_vqa_shards(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "pneumoniamnist.npz",
             train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [1], [0], [1]]))
    r = run_tool("tools/prepare_data.py", "--medmnist", str(tmp_path / "pneumoniamnist.npz"),
                 "--label-names", "normal,pneumonia", "--modality", "X-Ray", "--output",
                 str(tmp_path / "shards"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    records = [rec for rec, _ in read_shards(shard_paths(tmp_path / "shards"))]
    assert [rec["conversations"][1]["value"] for rec in records] == \
        ["normal", "pneumonia", "pneumonia", "normal", "pneumonia"]
    assert records[0]["modality"] == "X-Ray" and "Options: normal, pneumonia" in \
        records[0]["conversations"][0]["value"]
