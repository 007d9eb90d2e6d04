"""Records -> (input_ids, labels) with the authors' templates; loss only on answers + EOS.

`plain` (stage 1): `<image>` + caption + newline. `phi` / `stablelm` (stages 2-3, identical):
system line, then per turn ` USER: {q} ASSISTANT: {a}<|endoftext|>`, `<image>\\n` leading the
first question (once per image; the release's chat template writes the same). Labels are
unshifted, -100 where no loss (the model shifts)."""

from __future__ import annotations

from medmoe_mcore.conventions import EOS, IGNORE_INDEX, IMAGE_TOKEN, SYSTEM_PROMPT
from medmoe_mcore.data.records import ROLES, SkipRecord, conversations
from medmoe_mcore.data.tokenizer import Tokenizer

TEMPLATES = ("plain", "phi", "stablelm")


def _pieces(record: dict, template: str) -> list[tuple[str, bool]]:
    """(text, supervised) pieces in order."""
    turns = conversations(record)
    if template == "plain":
        answer = next(t["value"] for t in turns if ROLES[t["from"]] == "assistant")
        images = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        return [(IMAGE_TOKEN * images, False)] * bool(images) + [(answer.strip() + "\n", True)]
    pieces = [(SYSTEM_PROMPT, False)]
    for turn in turns:
        text = turn["value"].strip()
        if ROLES[turn["from"]] == "user":
            if IMAGE_TOKEN in text:  # LLaVA puts the images first, each with a newline
                text = (IMAGE_TOKEN + "\n") * text.count(IMAGE_TOKEN) + \
                    text.replace(IMAGE_TOKEN, "").strip()
            pieces.append((f" USER: {text} ASSISTANT:", False))
        else:
            pieces.append((f" {text}{EOS}", True))
    return pieces


def encode(record: dict, tok: Tokenizer, template: str, seq_length: int,
           num_patches: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; the spliced length (each `<image>` -> num_patches positions) is
    at most `seq_length`: the end is truncated, never the image; SkipRecord if that cannot be."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: choose from {TEMPLATES}")
    ids, labels = [], []
    for text, supervised in _pieces(record, template):
        piece = tok.encode(text)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    images = ids.count(tok.image_token_id)
    budget = seq_length - images * (num_patches - 1)
    last_image = max(i for i, t in enumerate(ids) if t == tok.image_token_id) \
        if images else -1
    if budget <= last_image + 1:
        raise SkipRecord("too_long", f"{images} image(s) need more than seq_length={seq_length}")
    ids, labels = ids[:budget], labels[:budget]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise SkipRecord("too_long", f"no answer token left within seq_length={seq_length}")
    return ids, labels


def encode_prompt(record: dict, tok: Tokenizer, template: str = "phi",
                  with_image: bool = True) -> list[int]:
    """Token ids of what the model reads before its first answer: the system line and the
    first user turn up to `ASSISTANT:` (router features; generation prompts). Without
    `with_image` (a text-only model) the `<image>` placeholder is dropped."""
    pieces = _pieces(record, template)
    end = next((i for i, (_, supervised) in enumerate(pieces) if supervised), len(pieces))
    text = "".join(piece for piece, _ in pieces[:end])
    if not with_image:
        text = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
    return tok.encode(text)
