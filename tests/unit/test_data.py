"""Templates and truncation (tools/prepare_data.py: tests/integration/test_prepare_data.py)."""


import pytest

from medmoe_mcore.conventions import IGNORE_INDEX as IGNORE
from medmoe_mcore.data.encoding import encode
from medmoe_mcore.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = ["What modality is this image?", "An X-ray of the chest.", "A CT scan.",
             "Yes.", "No."] * 20
    return train_bpe(lines, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_templates_supervise_answers_only(tok):
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat modality is this?"},
                                {"from": "gpt", "value": "A CT scan."},
                                {"from": "human", "value": "Is it an X-ray?"},
                                {"from": "gpt", "value": "No."}]}
    ids, labels = encode(record, tok, "phi", 512, 16)
    assert ids.count(tok.image_token_id) == 1
    supervised = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert supervised.replace(" ", "") == "ACTscan.<|endoftext|>No.<|endoftext|>"
    assert "A chat between" in tok.decode(ids)
    ids, labels = encode(record, tok, "plain", 512, 16)
    assert ids[0] == tok.image_token_id and labels[0] == IGNORE
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE]).strip() == "A CT scan."


def test_truncation_keeps_the_image(tok):
    from medmoe_mcore.data.records import SkipRecord

    record = {"conversations": [{"from": "human", "value": "<image>\nWhat modality?"},
                                {"from": "gpt", "value": "An X-ray of the chest. " * 20}]}
    ids, labels = encode(record, tok, "plain", 40, 16)
    assert len(ids) + 15 == 40 and ids[0] == tok.image_token_id
    with pytest.raises(SkipRecord, match="too_long"):
        encode(record, tok, "plain", 16, 16)
