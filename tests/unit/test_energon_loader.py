"""The energon loader (work in progress, issue 13): batches like the in-memory loader's and
an exact restore of its state with worker processes."""

import pytest
import torch

from medmoe_mcore.config import ModelConfig
from medmoe_mcore.data import demo
from medmoe_mcore.data.energon_loader import EnergonBatches, MedMoETaskEncoder
from medmoe_mcore.data.tokenizer import train_bpe
from medmoe_mcore.flavors import medmoe_language, vision_flavor


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("energon")
    folders = demo.build(root / "data", samples_per_image=4, held_out=1, show_progress=False)
    tok = train_bpe(demo.corpus(root / "data"), root / "tok")
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("tiny", tok.image_token_id))
    return folders["stage2"], tok, cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_continues_exactly(shards, workers):
    folder, tok, cfg = shards

    def batches():
        return EnergonBatches(folder, MedMoETaskEncoder(tok, "phi", 128, cfg), 2, 0, 1,
                              workers, seed=1234)

    first = batches()
    head = [first.next() for _ in range(3)]
    state = first.state()
    rest = [first.next() for _ in range(3)]
    again = batches()
    again.restore(state)
    for a, b in zip(rest, [again.next() for _ in range(3)]):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["images"], b["images"]) and a["lengths"] == b["lengths"]
    assert head[0]["images"].shape == (2, 3, 56, 56)
