"""Text-only records and records of several images beside one-image records: a micro-batch
mixing them gives each sample the per-token loss it has alone (dense and Med-MoE: the modality router routes each token by its
hidden state, so a text-only sample needs no modality), and the loader batches them with the
images of the others only."""

import dataclasses
import json

import pytest
import torch

from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.conventions import IMAGE_SENTINEL_ID
from medmoe_mcore.models.medmoe import MedMoEModel


@pytest.mark.parametrize("experts", [0, 4])
def test_a_mixed_micro_batch_equals_its_samples_alone(single_rank, experts):
    lm = dataclasses.replace(medmoe_language("tiny"), hidden_dropout=0.0)
    cfg = ModelConfig(language=lm, vision=vision_flavor("tiny", IMAGE_SENTINEL_ID),
                      moe=MoEConfig(num_experts=experts) if experts else None).validate()
    model = MedMoEModel(cfg, parallel_output=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)  # every expert gets tokens
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (1, 9), generator=gen)
    with_image = torch.randint(3, 500, (1, 6), generator=gen)
    with_image[0, 1] = IMAGE_SENTINEL_ID
    two = torch.randint(3, 500, (1, 7), generator=gen)
    two[0, 1] = two[0, 2] = IMAGE_SENTINEL_ID  # prior and current study
    v = cfg.vision
    images = torch.randn(3, 3, v.image_size, v.image_size, generator=gen)
    with torch.no_grad():
        alone_text, _ = model(text, None, labels=text)
        alone_image, _ = model(with_image, images[:1], labels=with_image)
        alone_two, _ = model(two, images[1:], labels=two)
        ids = torch.zeros(3, 9, dtype=torch.long)
        ids[0], ids[1, :6], ids[2, :7] = text[0], with_image[0], two[0]
        labels = torch.full_like(ids, -100)
        labels[0], labels[1, :6], labels[2, :7] = text[0], with_image[0], two[0]
        mixed, mask = model(ids, images, labels=labels)
    assert torch.allclose(mixed[0, :alone_text.shape[1]], alone_text[0], atol=1e-5)
    for row, alone in ((1, alone_image), (2, alone_two)):
        n = alone.shape[1]  # (its last position's label is padding in the mixed batch)
        assert torch.allclose(mixed[row, :n - 1], alone[0, :n - 1], atol=1e-5)


def test_the_loader_batches_text_only_samples_without_an_image(single_rank, tmp_path):
    from medmoe_mcore.data.loader import TEXT_ONLY, MedMoETaskEncoder
    from medmoe_mcore.data.tokenizer import train_bpe

    tok = train_bpe(["what does ct stand for", "an x-ray of the chest"], tmp_path / "tok",
                    vocab_size=300)
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("tiny", tok.image_token_id)).validate()
    encoder = MedMoETaskEncoder(tok, "phi", 1024, cfg)
    record = {"id": "t", "conversations": [{"from": "human", "value": "What does CT stand for?"},
                                           {"from": "gpt", "value": "Computed tomography."}]}
    sample = encoder.encode_sample({"record": record, "images": [], "__key__": "k",
                                    "__restore_key__": (), "__subflavors__": {}})
    assert sample["images"] == [] and sample["modality"] == TEXT_ONLY
    batch = encoder.batch([sample])
    assert batch["images"] is None and batch["modalities"] == [TEXT_ONLY]


def test_records_of_several_images_prepare_load_and_batch(single_rank, tmp_path):
    """An `images` record (prior and current study: a PNG and a DICOM) is stored as one
    record with its images in <image> order, loaded and batched with them in that order; a
    record with more images than --max-images-per-sample, or tokens and images that disagree,
    is a counted skip."""
    import io
    import shutil

    from PIL import Image
    from pydicom.data import get_testdata_file

    from medmoe_mcore.data.loader import MedMoETaskEncoder, _raw_record
    from medmoe_mcore.data.records import folder_reader, read_shards, write_shards
    from medmoe_mcore.data.tokenizer import train_bpe
    from medmoe_mcore.demo.medical_images import BY_NAME

    folder = tmp_path / "images"
    folder.mkdir()
    BY_NAME["immunohistochemistry"].load().save(folder / "prior.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "current.dcm")

    def record(rid, images, tokens):
        return {"id": rid, "images": images, "conversations": [
            {"from": "human", "value": "<image>\n" * tokens + "What changed?"},
            {"from": "gpt", "value": "Nothing."}]}

    records = [record("two", ["prior.png", "current.dcm"], 2),
               record("mismatch", ["prior.png", "current.dcm"], 1),
               record("many", ["prior.png"] * 3, 3)]
    report = write_shards(records, folder_reader(folder), tmp_path / "s", show_progress=False,
                          max_images=2)
    assert report.written == 1 and report.skipped == {"image_count_mismatch": 1,
                                                      "too_many_images": 1}
    assert dict(report.dicom) == {"percentile": 1}
    ((stored, blobs),) = list(read_shards(sorted((tmp_path / "s").glob("*.tar"))))
    assert stored["images"] == ["prior.png", "current.dcm.png"] and len(blobs) == 2
    assert Image.open(io.BytesIO(blobs[0])).size == Image.open(folder / "prior.png").size

    tok = train_bpe(["what changed", "nothing"], tmp_path / "tok", vocab_size=300)
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("tiny", tok.image_token_id)).validate()
    encoder = MedMoETaskEncoder(tok, "phi", 1024, cfg)
    raw = _raw_record({"__key__": "k", "__restore_key__": (), "__subflavors__": {},
                       "json": json.dumps(stored).encode(), "img1.png": blobs[1],
                       "img0.png": blobs[0]})
    assert raw["images"] == blobs  # in <image> order whatever the member order
    sample = encoder.encode_sample(raw)
    assert len(sample["images"]) == 2 and sample["ids"].count(tok.image_token_id) == 2
    batch = encoder.batch([sample, sample])
    assert batch["images"].shape[0] == 4
