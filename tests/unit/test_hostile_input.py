"""Hostile and careless input at every door: safetensors files that break the format's rules,
scorer files of random bytes and random JSON, two writers on one folder, a stale lock, a
sequence longer than the model's positions. Each ends in a named error, never a traceback."""

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.checkpoint.lock import LOCK, FolderLock, FolderLocked
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conversion.safetensors_io import CorruptFile, SafetensorsDir
from medmoe_mcore.eval.scoring import evaluate_predictions


def _write(folder: Path, header: dict, data: bytes, raw_header: bytes | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)
    return folder


def _entry(start, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


@pytest.mark.parametrize("header,data,raw,message", [
    ({"a": _entry(0, 8), "b": _entry(0, 8)}, bytes(8), None,
     r"tensor 'b' \(bytes 0-8\) overlaps tensor 'a'"),
    ({"a": _entry(0, 8), "b": _entry(12, 20)}, bytes(20), None,
     r"bytes 8-12 of the data belong to no tensor \(a hole before tensor 'b'\)"),
    ({"a": _entry(0, 8, shape=(3,))}, bytes(8), None,
     r"tensor 'a': F32 \[3\] needs 12 bytes, its data_offsets \[0, 8\] hold 8"),
    ({"a": _entry(0, 8)}, bytes(16), None, r"bytes 8-16 of the data belong to no tensor"),
    ({"a": _entry(0, 8, dtype="Q9")}, bytes(8), None, r"tensor 'a': unknown dtype 'Q9'"),
    ({"a": _entry(0, 16, shape=(4,))}, bytes(8), None,
     r"truncated: tensor 'a' ends at byte 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8), None,
     r"tensor 'a': a header entry needs exactly dtype, shape and data_offsets"),
    ({}, b"", b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     r"corrupt safetensors header \(RecursionError"),
])
def test_safetensors_rules_are_named_by_file_and_tensor(tmp_path, header, data, raw, message):
    folder = _write(tmp_path / "hf", header, data, raw)
    with pytest.raises(CorruptFile, match=message) as e:
        SafetensorsDir(folder)
    assert "model.safetensors" in str(e.value)


def test_a_header_longer_than_the_format_allows_is_refused_unread(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CorruptFile, match="header of 1000000000000 bytes claimed"):
        SafetensorsDir(tmp_path)


def test_a_valid_file_still_reads_zero_copy(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(0), "c": torch.tensor([7])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = SafetensorsDir(tmp_path)
    for key, value in tensors.items():
        assert torch.equal(src.get(key), value) and src.meta(key).shape == value.shape


# ---- the scorer: never a traceback ------------------------------------------------------

def _gold(tmp_path) -> Path:
    records = [{"id": i, "answer": a, "answer_type": t}
               for i, a, t in ((1, "yes", "closed"), (2, "left lung", "open"))]
    path = tmp_path / "gold.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


@pytest.mark.parametrize("lines,message", [
    ([b'{"id": 1, "prediction": "yes"}', b'{"id": 2, "prediction": "\xff\xfe"}'],
     r"pred.jsonl:2: not UTF-8"),
    ([b'{"id": 1, "prediction": "yes"}', b'[1, "left lung"]'],
     r"pred.jsonl line 2: a list, not a JSON object"),
    ([b'{"id": 1, "prediction": 3}'], r"pred.jsonl record 1: needs an id .* 'prediction'"),
    ([b'{"id": [1], "prediction": "x"}'], r"record 1: needs an id \(string or integer\)"),
])
def test_unreadable_prediction_records_are_named_or_skipped_and_counted(tmp_path, lines,
                                                                         message):
    pred = tmp_path / "pred.jsonl"
    pred.write_bytes(b"\n".join(lines))
    with pytest.raises(ConfigError, match=message):
        evaluate_predictions(_gold(tmp_path), pred)
    report = evaluate_predictions(_gold(tmp_path), pred, allow_missing=True)
    assert sum(report["unreadable_predictions"].values()) == 1
    assert report["num_missing"] >= 1


def test_a_gold_list_with_a_number_is_named(tmp_path):
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps([{"id": 1, "answer": "yes", "answer_type": "closed"}, 7]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text('{"id": 1, "prediction": "yes"}')
    with pytest.raises(ConfigError, match=r"gold.json record 2: a int, not a JSON object"):
        evaluate_predictions(gold, pred)


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**70, 1.5, float("nan")])
    if kind == 2:
        return rng.choice(["", "yes", "open", "closed", "\u0000", "x" * 50])
    if kind == 3:
        return rng.randrange(5)
    if kind == 4:
        return rng.choice(["id", "answer", "prediction", "labels"])
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["id", "question_id", "answer", "answer_type", "conversations", "labels",
            "prediction", "text", "modality", "dataset"]
    return {k: _random_json(rng, depth + 1) for k in rng.sample(keys, rng.randrange(len(keys)))}


def test_scorer_fuzz_only_named_errors(tmp_path):
    """Random bytes, random JSON values and near-valid records with random field types, as
    gold and as predictions, JSON list or JSON lines: a report or a ConfigError, nothing else."""
    rng = random.Random(0)
    gold, pred = tmp_path / "gold.json", tmp_path / "pred.jsonl"
    outcomes = {"report": 0, "named": 0}
    for trial in range(400):
        for path in (gold, pred):
            style = rng.randrange(3)
            if style == 0:
                path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(80))))
            elif style == 1:
                values = [_random_json(rng) for _ in range(rng.randrange(1, 5))]
                path.write_text(json.dumps(values, allow_nan=True))
            else:
                path.write_text("\n".join(json.dumps(_random_json(rng), allow_nan=True)
                                          for _ in range(rng.randrange(1, 5))))
        if trial % 4 == 0:  # a valid gold file, so predictions get past it
            gold.write_text(json.dumps([{"id": 1, "answer": "yes", "answer_type": "closed"}]))
        try:
            evaluate_predictions(gold, pred, allow_missing=bool(trial % 2))
            outcomes["report"] += 1
        except ConfigError as e:
            assert str(e), "an empty message"
            outcomes["named"] += 1
    assert outcomes["named"] > 100


def test_score_tool_refuses_in_one_line(tmp_path, capsys):
    from tools.evaluate import main

    pred = tmp_path / "pred.jsonl"
    pred.write_bytes(b'{"id": 1, "prediction": "\xff"}')
    assert main(["score", "--gold", str(_gold(tmp_path)), "--predictions", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "pred.jsonl:1: not UTF-8" in err and "Traceback" not in err


# ---- one writer per folder --------------------------------------------------------------

def test_a_lock_from_another_host_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"host": "gpu-node-17", "pid": 1, "what": "x"}))
    with pytest.raises(FolderLocked, match=f"gpu-node-17.*delete {folder / LOCK}"):
        FolderLock(folder, "y").acquire()


def test_each_save_gets_its_own_temporary_folder(tmp_path):
    a = store.begin_save(tmp_path / "run", iteration=5)
    b = store.begin_save(tmp_path / "run", iteration=5)
    assert a.tmp != b.tmp and a.tmp.name.startswith("iter_0000005.tmp-")
    with pytest.raises(store.NoCheckpoint, match="only an interrupted save"):
        store.resolve(tmp_path / "run")


def test_seq_length_beyond_the_positions_is_refused_naming_both(tmp_path):
    from medmoe_mcore.config.flavors import medmoe_language
    from medmoe_mcore.config.model import ModelConfig, ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.setup import stage_config

    cfg = ModelConfig(language=medmoe_language("tiny"))
    store.save(LanguageModel(cfg).sharded_state_dict(), tmp_path / "ckpt", cfg)
    limit = cfg.language.max_position_embeddings
    train = TrainConfig(stage=2, data_path=["d"], train_iters=2, lr=1e-3,
                        seq_length=limit + 1)
    with pytest.raises(ConfigError, match=f"--seq-length {limit + 1} exceeds the model's "
                                          f"max_position_embeddings {limit}"):
        stage_config(tmp_path / "ckpt", ParallelConfig(), train)
    train.seq_length = limit
    assert stage_config(tmp_path / "ckpt", ParallelConfig(), train).language is not None
