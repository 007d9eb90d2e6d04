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


def test_no_image_outside_the_folder_is_ever_opened(tmp_path, monkeypatch):
    """`..`, an absolute path and a symlink leading out are skipped as path_outside_root
    without reading the file (every read is watched); an image inside is read."""
    import pathlib

    from medmoe_mcore.data.records import SkipRecord, folder_reader

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "in.png").write_bytes(b"inside")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    opened, read_bytes = [], pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes",
                        lambda self: opened.append(self.name) or read_bytes(self))
    reader = folder_reader(tmp_path / "images")
    for name in ("../secret.png", str(tmp_path / "secret.png"), "link.png",
                 "sub/../../secret.png"):
        with pytest.raises(SkipRecord, match="path_outside_root"):
            reader({"image": name})
    assert reader({"image": "in.png"}) == b"inside" and reader({"image": "none.png"}) is None
    assert opened == ["in.png"]
