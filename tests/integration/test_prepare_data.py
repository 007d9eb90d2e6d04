"""tools/prepare_data.py as a user runs it: bad records counted by reason, MedMNIST."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from megatron.energon import (Cooker, DefaultTaskEncoder, WorkerConfig, basic_sample_keys,
                              get_savable_loader, get_train_dataset, stateless)

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.data.records import ShardError, read_shards, shard_paths
from medmoe_mcore.demo.medical_images import BY_NAME
from tests.conftest import run_tool


def _png(name, size=40):
    image = BY_NAME[name].load()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _conv(q, a, role="gpt"):
    return [{"from": "human", "value": q}, {"from": role, "value": a}]


def bomb_png(width=40000, height=40000) -> bytes:
    """A valid PNG of a few dozen bytes that claims width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                               0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def mixed_records(folder):
    """Good records plus one of each bad kind; returns the JSON path. A real, valid image
    lies outside the image folder, reached by `..`, an absolute path and a symlink."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "xray.png").write_bytes(_png("RG1_UNCI"))
    (folder / "images" / "ihc.png").write_bytes(_png("immunohistochemistry"))
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "images" / "bomb.png").write_bytes(bomb_png())
    (folder / "outside.png").write_bytes(_png("RG1_UNCI"))
    (folder / "images" / "link.png").symlink_to(folder / "outside.png")
    good = [{"id": f"g{i}", "image": "xray.png" if i % 2 else "ihc.png",
             "conversations": _conv("<image>\nWhat modality?", "An X-ray.")} for i in range(6)]
    good.append({"id": "typo", "image": "ihc.png",  # the authors' misspelt key
                 "conversatons": _conv("<image>\nWhat stain?", "IHC.")})
    good.append({"id": "text", "conversations": _conv("What does CT stand for?",
                                                      "Computed tomography.")})  # text only
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "corrupt", "image": "broken.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "noimg", "image": "xray.png", "conversations": _conv("What is it?", "A.")},
        {"id": "empty", "image": "xray.png", "conversations": _conv("<image>\nQ?", "  ")},
        {"id": "role", "image": "xray.png", "conversations": _conv("<image>\nQ?", "A.", "bot")},
        {"id": "long", "image": "xray.png", "conversations": _conv("<image>\n" + "x" * 500,
                                                                   "A.")},
        {"id": "malformed", "image": "xray.png"},
        {"id": "bomb", "image": "bomb.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "dotdot", "image": "../outside.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "absolute", "image": str(folder / "outside.png"),
         "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "symlink", "image": "link.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "twoimg", "image": "xray.png", "conversations": _conv("<image>\n<image>\nQ?",
                                                                     "A.")},
    ]
    text = json.dumps(good + bad)
    # A record whose text is not valid UTF-8 (raw byte 0xff inside its answer).
    text = text[:-1] + ', {"id": "latin1", "image": "xray.png", "conversations": ' \
        '[{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "caf__"}]}]'
    raw = text.encode("utf-8").replace(b"caf__", b"caf\xe9")
    (folder / "data.json").write_bytes(raw)
    return folder / "data.json"


def _mixed_shards(tmp_path):
    """mixed_records written to tmp_path/shards, 3 records a shard; returns the JSON path."""
    path = mixed_records(tmp_path / "src")
    r = run_tool("tools/prepare_data.py", "--json", str(path), "--image-folder",
                 str(tmp_path / "src" / "images"), "--output", str(tmp_path / "shards"),
                 "--samples-per-shard", "3", "--max-chars", "200", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    return path


def test_prepare_data_counts_each_bad_kind(tmp_path):
    path = _mixed_shards(tmp_path)
    report = json.loads((tmp_path / "shards" / "report.json").read_text())
    assert report["written"] == 8
    assert [s["records"] for s in report["shards"]] == [3, 3, 2]
    assert report["skipped"] == {**{k: 1 for k in (
        "missing_image", "corrupt_image", "no_image_token", "empty_answer", "unknown_role",
        "too_long", "malformed", "not_utf8", "image_too_large", "image_count_mismatch")},
        "path_outside_root": 3}
    assert report["examples"]["corrupt_image"] == ["corrupt"]
    assert report["examples"]["path_outside_root"] == ["dotdot", "absolute", "symlink"]
    assert report["examples"]["image_too_large"] == ["bomb"]
    records = list(read_shards(shard_paths(tmp_path / "shards")))
    assert [rec["id"] for rec, _ in records] == [f"g{i}" for i in range(6)] + ["typo", "text"]
    assert records[-1][1] is None and all(image for _, image in records[:-1])

    # an output folder holding shards is refused; --overwrite replaces it whole
    again = ("tools/prepare_data.py", "--json", str(path), "--image-folder",
             str(tmp_path / "src" / "images"), "--output", str(tmp_path / "shards"),
             "--max-chars", "200", "--no-progress")
    r = run_tool(*again)
    assert r.returncode == 2 and "already holds files" in r.stderr and "--overwrite" in r.stderr
    (tmp_path / "shards" / "stale-000009.tar").write_bytes(b"")
    r = run_tool(*again, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == \
        [".nv-meta", "report.json", "shard-000000.tar", "shard-000000.tar.idx"]
    assert not list(tmp_path.glob(".shards.*"))  # no partial or old folder left behind


def test_bad_input_files_are_refused_by_name(tmp_path):
    (tmp_path / "images").mkdir()
    for name, text, message in [
            ("list.json", '[{"id": 1},\n {"id": 2', "list.json: not a valid JSON list (line 2"),
            ("one.json", '{"id": 1, "image": "x.png"}', "one.json: a single JSON object"),
            ("lines.jsonl", '{"id": 1}\nnot json\n', "lines.jsonl: neither a JSON list nor "
                                                       "JSON lines: line 2")]:
        (tmp_path / name).write_text(text)
        r = run_tool("tools/prepare_data.py", "--json", str(tmp_path / name), "--image-folder",
                     str(tmp_path / "images"), "--output", str(tmp_path / "out"))
        assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]
        assert not (tmp_path / "out").exists()


def test_truncated_or_stray_shards_are_named(tmp_path):
    _mixed_shards(tmp_path)
    shard = tmp_path / "shards" / "shard-000001.tar"
    whole = shard.read_bytes()
    members = tarfile.open(shard).getmembers()
    boundary = members[4].offset  # the third record's first header: a clean cut
    for cut, message in ((boundary, "2 records, but .*report.json says 3"),
                         (members[3].offset_data + members[3].size // 2,  # mid-image
                          "corrupt or truncated shard")):
        shard.write_bytes(whole[:cut])
        with pytest.raises(ShardError, match=f"shard-000001.tar: {message}"):
            list(read_shards(shard_paths(tmp_path / "shards")))
    shard.write_bytes(whole)
    (tmp_path / "shards" / "extra.tar").write_bytes(whole)
    with pytest.raises(ShardError, match=r"not listed: \['extra.tar'\]"):
        shard_paths(tmp_path / "shards")


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


@stateless
def _record_id(sample: dict) -> dict:
    return dict(**basic_sample_keys(sample), rid=json.loads(sample["json"])["id"])


class _Ids(DefaultTaskEncoder):
    """Reads the crude samples' ids (the training task encoder is issue 13's next step)."""
    cookers = [Cooker(_record_id)]
    decoder = None

    def batch(self, samples):
        return [s["rid"] for s in samples]


def test_shards_are_an_energon_dataset_and_foreign_code_is_refused(tmp_path):
    """prepare_data's folder is energon-ready (its index agrees with report.json and energon
    reads every record); a description naming code from elsewhere is refused by name."""
    _mixed_shards(tmp_path)
    folder = tmp_path / "shards"
    report = json.loads((folder / "report.json").read_text())
    info = json.loads((folder / ".nv-meta" / ".info.json").read_text())
    assert info["shard_counts"] == {s["name"]: s["records"] for s in report["shards"]}
    dataset = get_train_dataset(str(folder), batch_size=8, shuffle_buffer_size=None,
                                max_samples_per_sequence=None, task_encoder=_Ids(),
                                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0))
    assert sorted(next(iter(get_savable_loader(dataset)))) == \
        sorted([f"g{i}" for i in range(6)] + ["typo", "text"])  # the text-only one too
    description = folder / ".nv-meta" / "dataset.yaml"
    for text, named in (("__module__: evil\n__class__: Payload\n", "__module__: 'evil'"),
                        ("__module__: megatron.energon\n__class__: CrudeWebdataset\n"
                         "sample_loader: sample_loader.py:sample_loader\n", "sample_loader"),
                        ("__module__: megatron.energon\n__class__: CrudeWebdataset\n"
                         "subflavors:\n  x:\n    __module__: os\n", "subflavors.x.__module__")):
        description.write_text(text)
        with pytest.raises(ConfigError, match=f"refused.*{named}"):
            shard_paths(folder)


def _train_two_iterations(shards, ws, batch: int) -> str:
    """Stage 2 for 2 iterations of `batch` on `shards` in the main job's path; its log."""
    r = run_tool("examples/pretrain_medmoe.py", "--stage", "2", "--data-path", str(shards),
                 "--pretrained-checkpoint", str(ws["init"]), "--train-iters", "2",
                 "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
                 "--seq-length", "96", "--lr", "1e-3", "--num-workers", "0", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads(r.stdout.strip().splitlines()[-1])["losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    return r.stdout


def _hf_dataset(root, broken: bool = False):
    """A Med-VQA dataset as the hub keeps VQA-RAD (image bytes, question, answer), saved both
    as parquet files (data/train-*.parquet) and as a save_to_disk Arrow folder."""
    import datasets

    names = ["RG1_UNCI", "MR_small", "693_UNCI", "immunohistochemistry"]
    images = [{"bytes": _png(n), "path": f"{n}.png"} for n in names]
    if broken:
        images[1] = {"bytes": b"not an image at all", "path": "x.png"}
    rows = {"image": images, "question": [f"Is this image {i}?" for i in range(4)],
            "answer": ["yes", "no", "the left lung", "yes"],
            "modality": ["X-Ray", "MRI", "CT", "Pathology"]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "modality": datasets.Value("string")}))
    (root / "parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "arrow"))
    return root / "parquet", root / "arrow"


def test_hf_datasets_prepare_and_train(tmp_path, single_rank):
    """Parquet and Arrow dataset folders with real images prepare into shards (the JSON path's
    report fields), which train in the main job's path; bad input is named or counted."""
    pytest.importorskip("datasets")
    from tests.demo_setup import make_workspace

    parquet, arrow = _hf_dataset(tmp_path / "hub")
    reports = {}
    for kind, folder in (("parquet", parquet), ("arrow", arrow)):
        r = run_tool("tools/prepare_data.py", "--hf-dataset", str(folder), "--columns",
                     "modality=modality", "--output", str(tmp_path / kind), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        reports[kind] = json.loads((tmp_path / kind / "report.json").read_text())
    assert reports["parquet"] == reports["arrow"] and reports["parquet"]["written"] == 4
    assert set(reports["parquet"]) == {"written", "skipped", "skipped_total", "examples",
                                       "shards", "dicom_frames_by_windowing"}
    stored = [r for r, _ in read_shards(shard_paths(tmp_path / "parquet"))]
    assert [(r["answer_type"], r["modality"]) for r in stored] == [
        ("CLOSED", "X-Ray"), ("CLOSED", "MRI"), ("OPEN", "CT"), ("CLOSED", "Pathology")]
    assert stored[2]["conversations"][0]["value"] == "<image>\nIs this image 2?"

    _train_two_iterations(tmp_path / "parquet", make_workspace(tmp_path / "ws"), batch=2)

    broken, _ = _hf_dataset(tmp_path / "broken", broken=True)
    r = run_tool("tools/prepare_data.py", "--hf-dataset", str(broken), "--output",
                 str(tmp_path / "b"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["written"] == 3 and report["skipped"] == {"corrupt_image": 1}
    r = run_tool("tools/prepare_data.py", "--hf-dataset", str(broken), "--columns",
                 "question=query", "--output", str(tmp_path / "c"), "--no-progress")
    assert r.returncode == 2 and "the dataset has no column question=query (its columns: " \
        "image, question, answer, modality)" in r.stderr
    r = run_tool("tools/prepare_data.py", "--hf-dataset", str(broken), "--split", "test",
                 "--output", str(tmp_path / "d"), "--no-progress")
    assert r.returncode == 2 and "--hf-dataset" in r.stderr and "test" in r.stderr


def test_text_only_and_image_records_train_together(tmp_path, single_rank):
    """The prepared shards (image records and one text-only record) train in the main job's
    path (2 iterations of 4 read the 8 records: one epoch), none skipped."""
    from tests.demo_setup import make_workspace

    _mixed_shards(tmp_path)
    log = _train_two_iterations(tmp_path / "shards", make_workspace(tmp_path / "ws"), batch=4)
    assert "skipped" not in log.split("data read this run")[-1]
