"""Questions about images -> prompts and preprocessed images, sharded over data-parallel ranks
and decoded micro-batch by micro-batch; answers gathered back in input order.

A question file is JSON lines: `question` (or LLaVA's `text`), `image` (a path, relative to
`image_folder`), optional `id` (or `question_id`). Images: PNG/JPEG/... or DICOM, preprocessed
as the authors do at evaluation (CLIP's resize + centre crop, no padding to a square).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conventions import IMAGE_TOKEN
from medmoe_mcore.data.encoding import encode_prompt
from medmoe_mcore.data.images import load_image, preprocess
from medmoe_mcore.data.tokenizer import Tokenizer
from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.engine import forward_once, generate, padded


@dataclass
class Question:
    index: int  # position in the input (answers come back in this order; sampling seed)
    id: object
    question: str
    # a path, the image's name when `image_bytes` holds it (shards), a list of them (a
    # question about several images, in <image> order), or None: a text-only question
    image: str | list | None
    modality: str = "-"
    image_bytes: bytes | list | None = None
    dicom: object = None  # data/dicom.py's DicomOptions (None: the file's window)

    @property
    def images(self) -> list:
        return [] if self.image is None else \
            list(self.image) if isinstance(self.image, list) else [self.image]

    def load_images(self) -> list:
        blobs = self.image_bytes if isinstance(self.image_bytes, list) else \
            [self.image_bytes] * len(self.images)
        return [load_image(data if data is not None else name, name=name, dicom=self.dicom)
                for name, data in zip(self.images, blobs)]

    def load_image(self):
        """The question's one image (router features, single-image tools)."""
        (image,) = self.load_images()
        return image


def read_questions(path, image_folder=None) -> list[Question]:
    """Questions of a JSONL file; a bad line stops with its line number and the key."""
    out = []
    folder = Path(image_folder) if image_folder else Path(path).parent
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e})") from None
        text = record.get("question", record.get("text"))
        given = record.get("images", record.get("image"))
        names = given if isinstance(given, list) else [] if given is None else [given]
        if not isinstance(text, str) or not all(isinstance(x, str) for x in names):
            raise ConfigError(f"{path}:{n}: needs a 'question' (or 'text') string and an "
                              "'image' path, an 'images' list, or neither (a text-only "
                              "question)")
        paths = []
        for name in names:
            image = Path(name) if Path(name).is_absolute() else folder / name
            if not image.is_file():
                raise ConfigError(f"{path}:{n}: image {image} not found")
            paths.append(str(image))
        out.append(Question(len(out), record.get("id", record.get("question_id", n)),
                            text.replace(IMAGE_TOKEN, "").strip(),
                            paths if isinstance(given, list) else
                            (paths[0] if paths else None)))
    if not out:
        raise ConfigError(f"{path}: no questions")
    return out


def _prompt(q: Question, tok: Tokenizer, template: str) -> list[int]:
    text = f"{IMAGE_TOKEN}\n" * len(q.images) + q.question
    return encode_prompt({"conversations": [{"from": "human", "value": text}]}, tok, template)


def answer(model, questions: list[Question], tok: Tokenizer, gen: GenerationConfig,
           show=None, expert_stats=None) -> list[dict] | None:
    """Decode every question; returns the answers in input order on rank 0 (None
    elsewhere). Each data-parallel rank takes every dp-th question; all ranks run the same
    number of micro-batches (expert-parallel all-to-alls need everyone).

    With `expert_stats` (models/moe/stats.ExpertActivation), each micro-batch's prompts and
    the answer tokens fed back while decoding run once more in one pass, counted."""
    vision = model.model_config.vision
    dp = parallel_state.get_data_parallel_world_size()
    mine = questions[parallel_state.get_data_parallel_rank()::dp]
    batches = [mine[i:i + gen.micro_batch_size]
               for i in range(0, len(mine), gen.micro_batch_size)]
    count = torch.tensor([len(batches)], device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    results = []
    for b in range(int(count.item())):
        batch = batches[b] if b < len(batches) else questions[:1]  # a stand-in, discarded
        prompts = [_prompt(q, tok, gen.template) for q in batch]
        pictures = [preprocess(image, vision, train=False)  # in <image> order
                    for q in batch for image in q.load_images()]
        images = torch.stack(pictures) if pictures else None
        tokens = generate(model, prompts, images, tok.eos_id, gen,
                          sample_ids=[q.index for q in batch], pad_id=tok.pad_id)
        if expert_stats is not None:
            # the last new token was never fed back: it routed nowhere
            fed = [p + t[:-1] for p, t in zip(prompts, tokens)]
            ids = padded(fed, tok.pad_id, count.device)
            expert_stats.begin_batch(ids, map(len, fed), [q.modality for q in batch])
            forward_once(model, ids, images)
            expert_stats.end_batch()
        if b < len(batches):
            for q, t in zip(batch, tokens):
                text = tok.decode([x for x in t if x != tok.eos_id]).strip()
                results.append({"index": q.index, "id": q.id, "question": q.question,
                                "image": q.image, "answer": text, "tokens": t})
        if show:
            show(b + 1, int(count.item()))
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [results]
    if dist.is_initialized():
        dist.all_gather_object(gathered, results)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    by_index = {r["index"]: r for part in gathered for r in part}
    return [by_index[q.index] for q in questions]
