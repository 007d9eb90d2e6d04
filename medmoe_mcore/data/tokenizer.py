"""Tokenizers: an HF tokenizer folder or a sentencepiece model, `<image>` a special token.

The demo trains a small byte-level BPE (Phi-2's kind, with the `tokenizers` library) on its own
corpus (offline, milliseconds) and keeps it as an HF tokenizer folder, so that exports load it
with `AutoTokenizer`; real runs pass the backbone's HF tokenizer folder (e.g. Phi-2's).
Sentencepiece `.model` files are read too (training), but an HF export needs an HF folder."""

from __future__ import annotations

from pathlib import Path

from medmoe_mcore.conventions import EOS, IMAGE_TOKEN


class Tokenizer:
    """encode(text) -> ids with `<image>` and EOS as single tokens."""

    def __init__(self, path):
        path = Path(path)
        if not path.exists():  # transformers would take it for a hub repo id
            raise FileNotFoundError(f"{path}: no tokenizer there (an HF tokenizer folder or a "
                                    "sentencepiece .model; tools take --tokenizer)")
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


def train_bpe(lines: list[str], folder, vocab_size: int = 1000) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (any text, never unknown) with EOS and
    `<image>` as special tokens, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, IMAGE_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                            additional_special_tokens=[IMAGE_TOKEN]).save_pretrained(str(folder))
    return Tokenizer(folder)
