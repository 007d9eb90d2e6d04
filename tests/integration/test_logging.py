"""The training logs through examples/pretrain_medmoe.py: a short stage logged to TensorBoard
and to W&B in offline mode (`WANDB_MODE=offline`, no network) gives W&B the same scalars at the
same iterations as TensorBoard, and the run's configuration; `--log-throughput` puts the model
TFLOP/s per GPU in the log line and the logs, and the FLOPs it stands for are the closed form's
(models/flops.py) for the step's micro-batch; the checkpoint's training history reaches a
release's model card."""

import json
import os
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_tool
from tests.demo_setup import make_workspace

pytest.importorskip("wandb")


def wandb_records(run_file: Path) -> list:
    """Every record of an offline W&B run file, decoded with W&B's own protocol buffers. The
    file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with
    a header (CRC32, length, kind: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(records) -> dict:
    """{iteration: {name: value}} of the run's logged scalars."""
    points = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in r.history.item}
            points.setdefault(item["_step"], {}).update(
                {k: v for k, v in item.items() if not k.startswith("_")})
    return points


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_wandb_offline_equals_tensorboard_and_throughput_is_the_closed_form(tmp_path,
                                                                            workspace):
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models import flops

    os.environ["WANDB_MODE"] = "offline"  # inherited by the run; no network, no login
    try:
        r = run_tool("examples/pretrain_medmoe.py", "--stage", "2", "--data-path",
                     workspace["shards"]["stage2"], "--pretrained-checkpoint", workspace["init"],
                     "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "2",
                     "--seq-length", "96", "--lr", "1e-3", "--log-interval", "1",
                     "--valid-data-path", workspace["shards"]["stage3"], "--eval-interval", "2",
                     "--eval-iters", "1", "--save", str(tmp_path / "ckpt"),
                     "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "medmoe-test",
                     "--wandb-exp-name", "short", "--log-throughput", timeout=600)
    finally:
        del os.environ["WANDB_MODE"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if " iteration " in x and "lm loss:" in x]
    assert len(lines) == 3 and all("throughput per GPU (TFLOP/s/GPU): " in x for x in lines)

    tb = EventAccumulator(str(tmp_path / "tb" / "stage2")).Reload()
    run_files = list((tmp_path / "ckpt" / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    records = wandb_records(run_files[0])
    history = _history(records)
    names = set(tb.Tags()["scalars"])
    assert {"lm-loss", "learning-rate", "grad-norm", "throughput", "lm-loss-validation"} <= names
    for name in names:
        for event in tb.Scalars(name):
            # TensorBoard keeps float32; W&B the float64 the trainer logged
            assert history[event.step][name] == pytest.approx(event.value, rel=1e-6), name
    assert sorted(history) == [1, 2, 3]
    assert {k for point in history.values() for k in point} == names
    run = next(x.run for x in records if x.WhichOneof("record_type") == "run")
    assert run.display_name == "short-stage2" and run.run_group == "short"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train"]["lr"] == 1e-3 and config["model"]["language"]["hidden_size"] > 0

    # the logged TFLOP/s x the step's time (one GPU, one iteration per window) are the closed
    # form's FLOPs of one micro-batch of 2 samples, at some spliced length with 0-4 images
    cfg = store.read_config(workspace["init"])
    for step, point in history.items():
        logged = point["throughput"] * 1e12 * point["iteration-time-ms"] / 1000
        closest = min((abs(flops.training_flops(cfg, 2, s, n) / logged - 1), s, n)
                      for s in range(1, 96 + 4 * cfg.vision.num_patches) for n in range(5))
        assert closest[0] < 1e-9, (step, closest)

    # the checkpoint's history reaches a release's model card: stage 2, 3 iterations of 2
    from medmoe_mcore.conversion.release import export_release

    history = json.loads((tmp_path / "ckpt" / "iter_0000003" / store.TRAINING_STAGES)
                         .read_text())
    assert [(s["stage"], s["iterations"], s["lr"]) for s in history] == [(2, 3, 1e-3)]
    card = (export_release(tmp_path / "ckpt", tmp_path / "release", show_progress=False)
            / "README.md").read_text()
    assert "| 2 | 3 | 6 | 2 | 96 | 0.001 (0) |" in card, card
