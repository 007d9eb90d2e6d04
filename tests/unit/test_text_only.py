"""Text-only records beside image records: a micro-batch mixing them gives each sample the
per-token loss it has alone (dense and Med-MoE: the modality router routes each token by its
hidden state, so a text-only sample needs no modality), and the loader batches them with the
images of the others only."""

import dataclasses

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
    v = cfg.vision
    image = torch.randn(1, 3, v.image_size, v.image_size, generator=gen)
    with torch.no_grad():
        alone_text, _ = model(text, None, labels=text)
        alone_image, _ = model(with_image, image, labels=with_image)
        ids = torch.zeros(2, 9, dtype=torch.long)
        ids[0], ids[1, :6] = text[0], with_image[0]
        labels = torch.full_like(ids, -100)
        labels[0], labels[1, :6] = text[0], with_image[0]
        mixed, mask = model(ids, image, labels=labels)
    assert torch.allclose(mixed[0, :alone_text.shape[1]], alone_text[0], atol=1e-5)
    n = alone_image.shape[1]
    assert torch.allclose(mixed[1, :n - 1], alone_image[0, :n - 1], atol=1e-5)


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
    sample = encoder.encode_sample({"record": record, "image": None, "__key__": "k",
                                    "__restore_key__": (), "__subflavors__": {}})
    assert sample["image"] is None and sample["modality"] == TEXT_ONLY
    batch = encoder.batch([sample])
    assert batch["images"] is None and batch["modalities"] == [TEXT_ONLY]
