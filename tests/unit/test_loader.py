"""The energon loader: an exact restore of its state (through the bytes our checkpoints
keep) with 0 and 2 worker processes; blends by weight; validation the same every time."""

import multiprocessing

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.data.blend import data_blend
from medmoe_mcore.data.loader import (MedMoETaskEncoder, TrainingBatches, ValidationBatches,
                                      training_batches)
from medmoe_mcore.data.tokenizer import train_bpe
from medmoe_mcore.demo import dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("energon")
    folders = dataset.build(root / "data", samples_per_image=4, held_out=1, show_progress=False)
    tok = train_bpe(dataset.corpus(root / "data"), root / "tok")
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("tiny", tok.image_token_id))
    return folders, MedMoETaskEncoder(tok, "phi", 128, cfg)


def encoder_cfg(encoder):
    return ModelConfig(language=medmoe_language("tiny"), vision=encoder.vision)


def restored_after(batches, keys, n=3):
    """Reads 2n micro-batches from one loader; a second, restored from the state after n,
    gives the last n again (each key equal). Returns (first, again, head, rest)."""
    first = batches()
    head = [first.next() for _ in range(n)]
    state = first.state_bytes()
    rest = [first.next() for _ in range(n)]
    again = batches()
    again.restore_bytes(state, "test")
    for a, b in zip(rest, [again.next() for _ in range(n)]):
        for key in keys:
            assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key])
                    else a[key] == b[key]), key
    return first, again, head, rest


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_continues_exactly(shards, workers):
    folders, encoder = shards

    def batches():  # with workers: in a helper process, as in training
        return training_batches(data_blend(str(folders["stage2"])), encoder, 2, 0, 1, workers,
                                seed=1234)

    first, again, head, rest = restored_after(batches, ("input_ids", "images", "lengths"))
    assert head[0]["images"].shape == (2, 3, 56, 56)
    assert sum(first.read_per_dataset()) == 12
    first.close(), again.close()


def test_blend_draws_by_weight(shards):
    folders, encoder = shards
    blend = data_blend(["3", str(folders["stage2"]), "1", str(folders["stage3"])])
    assert [d.weight for d in blend.datasets] == [0.75, 0.25]
    assert "stage2" in blend.summary() and "stage3" in blend.summary()
    batches = TrainingBatches(blend, encoder, 4, 0, 1, 0, seed=1234)
    for _ in range(100):  # 400 samples
        batches.next()
    drawn = batches.read_per_dataset()
    assert sum(drawn) == 400
    assert abs(drawn[0] / 400 - 0.75) < 0.05, drawn


def test_validation_is_the_same_every_time(shards):
    folders, encoder = shards
    valid = ValidationBatches(data_blend(str(folders["test"])), encoder, 2, 0, 1, 0, seed=1)
    a, b = valid.micro_batches(30), valid.micro_batches(30)  # more than the set: wraps
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_bad_blends_refused(shards, tmp_path):
    folders, _ = shards
    for value, text in ((["0.5", str(folders["stage2"]), "0.5"], "odd number"),
                        (["x", str(folders["stage2"])], "'x' is not a weight"),
                        (["-1", str(folders["stage2"]), "1", str(folders["stage3"])],
                         "must be positive"),
                        ([str(tmp_path)], "not an energon dataset")):
        with pytest.raises(ConfigError, match=text):
            data_blend(value)
    evil = tmp_path / "blend.yaml"
    evil.write_text("__module__: evil\n__class__: Pwn\nsplits: {}\n")
    with pytest.raises(ConfigError, match="evil"):
        data_blend(str(evil))


@pytest.mark.parametrize("workers", [0, 2])
def test_records_that_cannot_fit_stop_the_run(shards, workers):
    """Energon would skip forever: the loader gives up naming the reason and the length
    (raised in a worker, it reaches the caller through the helper process)."""
    folders, encoder = shards
    short = MedMoETaskEncoder(encoder.tok, "phi", 8, encoder_cfg(encoder))
    batches = training_batches(data_blend(str(folders["stage2"])), short, 2, 0, 1, workers,
                               seed=1)
    with pytest.raises(ConfigError, match="--seq-length 8"):
        batches.next()
    batches.close()
    # the helper (and with it its workers) is gone
    assert not [p for p in multiprocessing.active_children() if p.name.endswith(" loader")]


def test_metadataset_yaml_blends(shards, tmp_path):
    folders, encoder = shards
    mds = tmp_path / "blend.yaml"
    mds.write_text(f"""__module__: megatron.energon
__class__: MetadatasetV2
splits:
  train:
    blend:
      - weight: 3
        path: {folders['stage2']}
      - weight: 1
        path: {folders['stage3']}
""")
    blend = data_blend(str(mds))
    assert [d.name for d in blend.datasets] == ["stage2", "stage3"]
    batches = TrainingBatches(blend, encoder, 4, 0, 1, 0, seed=1234)
    for _ in range(25):
        batches.next()
    drawn = batches.read_per_dataset()
    assert sum(drawn) == 100 and min(drawn) > 0, drawn


def test_balanced_micro_batches_spread_each_modality_and_drop_nothing():
    from medmoe_mcore.data.loader import balanced_micro_batches

    window = [{"modality": m, "i": i} for i, m in enumerate("AAAAAAAABBBBCCCC")]
    groups = balanced_micro_batches(window, 4)
    assert [sorted(s["modality"] for s in g) for g in groups] == [["A", "A", "B", "C"]] * 4
    assert sorted(s["i"] for g in groups for s in g) == list(range(16))
    assert balanced_micro_batches(window, 4) == groups  # no randomness


@pytest.mark.parametrize("workers", [0, 2])
def test_balanced_batches_mix_modalities_and_restore_exactly(shards, workers):
    folders, encoder = shards
    balanced = MedMoETaskEncoder(encoder.tok, "phi", 128, encoder_cfg(encoder),
                                 balance_micro_batch=4)

    def batches(enc):
        return training_batches(data_blend(str(folders["stage3"])), enc, 4, 0, 1, workers,
                                seed=1234)

    first = batches(balanced)
    head = [first.next() for _ in range(5)]
    state = first.state_bytes()
    rest = [first.next() for _ in range(6)]
    again = batches(balanced)
    again.restore_bytes(state, "test")
    for a, b in zip(rest, [again.next() for _ in range(6)]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"],
                                                                            b["images"])
        assert a["modalities"] == b["modalities"]
    plain = batches(encoder)
    mixed = [len(set(b["modalities"])) for b in head + rest]
    unmixed = [len(set(plain.next()["modalities"])) for _ in range(len(mixed))]
    assert all(len(b["modalities"]) == 4 for b in head + rest)
    assert sum(mixed) > sum(unmixed), (mixed, unmixed)
    for loader in (first, again, plain):
        loader.close()


def test_sequence_packs_fill_rows_first_fit_and_drop_nothing():
    from medmoe_mcore.data.packing import sequence_packs

    lengths = [70, 50, 60, 20, 128, 40, 30]
    packs = sequence_packs(list(range(7)), lengths, 128)
    assert sorted(i for p in packs for i in p) == list(range(7))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    assert packs == [[0, 1], [2, 3, 5], [4], [6]]  # longest first, each to the first row it fits
    assert sequence_packs(list(range(7)), lengths, 128) == packs  # no randomness


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_rows_hold_several_samples_and_restore_exactly(shards, workers):
    folders, encoder = shards
    # the demo's stage-2 samples take 87-105 tokens: two to a row of 256
    packing = MedMoETaskEncoder(encoder.tok, "phi", 256, encoder_cfg(encoder), pack=True)
    patches = encoder.vision.num_patches

    def batches():
        return training_batches(data_blend(str(folders["stage2"])), packing, 2, 0, 1, workers,
                                seed=1234)

    first, again, head, rest = restored_after(
        batches, ("input_ids", "labels", "sample_index", "images", "lengths"))
    for batch in head + rest:
        index, ids = batch["sample_index"], batch["input_ids"]
        assert batch["samples"] > ids.shape[0]  # several samples per row
        assert batch["samples"] == len(batch["datasets"]) == \
            sum(int(row[:n].max()) + 1 for row, n in zip(index, batch["lengths"]))
        images = (ids == encoder.tok.image_token_id).sum(dim=1)
        assert all(n + k * (patches - 1) <= 256 for n, k in zip(batch["lengths"], images))
    assert sum(first.read_per_dataset()) == sum(b["samples"] for b in head + rest)
    first.close(), again.close()


def test_packing_refuses_sample_routing_and_balanced_batches(shards):
    from medmoe_mcore.config.model import MoEConfig

    _, encoder = shards
    cfg = encoder_cfg(encoder)
    cfg.moe = MoEConfig(num_experts=4, routing_granularity="sample")
    with pytest.raises(ConfigError, match="--moe-routing-granularity sample"):
        MedMoETaskEncoder(encoder.tok, "phi", 128, cfg, pack=True)
    from medmoe_mcore.training.config import TrainConfig

    train = TrainConfig(stage=2, data_path=["d"], train_iters=1, lr=1e-3,
                        pretrained_checkpoint="c", pack_sequences=True,
                        balanced_modality_batches=True)
    with pytest.raises(ConfigError, match="--pack-sequences and --balanced-modality-batches"):
        train.validate(dp=1)
