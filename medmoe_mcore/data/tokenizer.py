"""Tokenizers: an HF tokenizer folder or a sentencepiece model, `<image>` a special token.

The demo trains a small sentencepiece model on its own corpus (offline, milliseconds); real
runs pass the backbone's HF tokenizer folder (e.g. Phi-2's GPT-2 BPE)."""

from __future__ import annotations

import io
from pathlib import Path

from medmoe_mcore.conventions import EOS, IMAGE_TOKEN


class Tokenizer:
    """encode(text) -> ids with `<image>` and EOS as single tokens."""

    def __init__(self, path):
        path = Path(path)
        model = path / "tokenizer.model" if path.is_dir() else path
        if model.suffix == ".model" and model.exists():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(model))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            self.image_token_id = self._sp.piece_to_id(IMAGE_TOKEN)
            self.eos_id = self._sp.piece_to_id(EOS)
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
            unk = self._sp.unk_id()
            if unk in (self.image_token_id, self.eos_id):
                raise ValueError(f"{model}: sentencepiece model lacks {IMAGE_TOKEN} or {EOS} "
                                 "as user-defined symbols")
        else:
            from transformers import AutoTokenizer

            self._sp = None
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._hf.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
            if self._hf.convert_tokens_to_ids(EOS) is None:
                self._hf.add_special_tokens({"eos_token": EOS})
            self.vocab_size = len(self._hf)
            self.image_token_id = self._hf.convert_tokens_to_ids(IMAGE_TOKEN)
            self.eos_id = self._hf.convert_tokens_to_ids(EOS)
            self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None \
                else self.eos_id
        self.path = path

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids)) if self._sp is not None else self._hf.decode(ids)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._sp is not None:
            (folder / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        else:
            self._hf.save_pretrained(str(folder))


def train_sentencepiece(lines: list[str], folder, vocab_size: int = 1000) -> Tokenizer:
    """A BPE sentencepiece model of at most `vocab_size` pieces with `<image>` and EOS."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
        model_type="bpe", hard_vocab_limit=False, user_defined_symbols=[IMAGE_TOKEN, EOS],
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, character_coverage=1.0,
        add_dummy_prefix=False, byte_fallback=True, num_threads=1, minloglevel=2)  # any text, never <unk>
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    return Tokenizer(folder)
