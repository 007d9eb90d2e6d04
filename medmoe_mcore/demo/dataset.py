"""The embedded demo dataset: real medical images from pip packages, light deterministic
augmentation, captions and Q/A from each image's known facts. Generated once into a cache
folder (LLaVA JSON per stage + images), then written to shards like any user dataset.

Stage 3 mixes Med-VQA-style questions (open / closed) with a MedMNIST-style modality
classification (`labels`), as the paper's stage 3 mixes VQA-RAD/SLAKE/PathVQA with MedMNIST.
The last `held_out` augmentations of every image are never trained on: they form the `test`
split (stage-3 records), the main job's validation data and held-out evaluation. They are new
crops of the same few source images, so the scores say how well the demo model learned its
data, not how it generalises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medmoe_mcore.data.records import folder_reader, load_json_records, write_shards
from medmoe_mcore.demo.medical_images import CATALOGUE, MedicalImage

VERSION = 3
STAGES = ("stage1", "stage2", "router", "stage3", "test")
# The router's modalities (the paper's four); other images join stages 1-3 only.
ROUTER_MODALITIES = ("CT", "MRI", "Pathology", "X-Ray")
MODALITY_WORDS = {"X-Ray": "an X-ray", "CT": "a CT scan", "MRI": "an MRI scan",
                  "Ultrasound": "an ultrasound", "Pathology": "a pathology slide",
                  "Fundus": "a fundus photograph"}


def _augment(image: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Random crop (80-100%), horizontal flip, intensity scale; longest side -> `size`."""
    w, h = image.size
    scale = rng.uniform(0.8, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out.thumbnail((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(out, dtype=np.float32) * rng.uniform(0.85, 1.15)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _records(m: MedicalImage, image: str, rid: str, rng: np.random.Generator) -> dict:
    modality = MODALITY_WORDS[m.modality]
    plane = f" in the {m.plane} plane" if m.plane else ""
    caption = f"{m.description[0].upper()}{m.description[1:]}{plane}; the image is {m.colour}."
    other = [x for x in MODALITY_WORDS if x != m.modality][int(rng.integers(0, 5))]
    qa = [
        ("What imaging modality is used?", f"The image is {modality}.", "OPEN"),
        ("Which part of the body is shown?", f"The {m.organ}.", "OPEN"),
        (f"Is this {MODALITY_WORDS[other]}?", "No.", "CLOSED"),
        (f"Is this {modality}?", "Yes.", "CLOSED"),
        ("Is the image in colour?", "Yes." if m.colour == "colour" else "No.", "CLOSED"),
    ]
    q, a, kind = qa[int(rng.integers(0, len(qa)))]
    q2, a2, _ = qa[int(rng.integers(0, len(qa)))]
    human = lambda text: {"from": "human", "value": text}  # noqa: E731
    gpt = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    vqa = {"id": rid, "image": image, "answer_type": kind, "modality": m.modality,
           "dataset": "demo-vqa", "conversations": [human(f"<image>\n{q}"), gpt(a)]}
    classification = {
        "id": f"{rid}-modality", "image": image, "answer_type": "CLOSED",
        "modality": m.modality, "dataset": "demo-modality", "labels": list(MODALITY_WORDS),
        "conversations": [human(f"<image>\nWhich modality is this image? Options: "
                                f"{', '.join(MODALITY_WORDS)}."), gpt(m.modality)]}
    return {
        "stage1": {"id": rid, "image": image, "conversations": [human("<image>"), gpt(caption)]},
        "stage2": {"id": rid, "image": image, "conversations": [
            human(f"<image>\nDescribe the image. {q}"), gpt(f"{caption} {a}"), human(q2),
            gpt(a2)]},
        "router": {"id": rid, "image": image, "modality": m.modality, "conversations": [
            human(f"<image>\n{q}"), gpt(a)]},
        "stage3": [vqa, classification],
    }


def shard_folders(cache_dir) -> dict[str, Path]:
    """{stage: shard folder} of a demo data folder (what `build` writes)."""
    return {s: Path(cache_dir) / "shards" / s for s in STAGES}


def build(cache_dir, samples_per_image: int = 40, image_size: int = 96, seed: int = 0,
          show_progress: bool = True, held_out: int = 4) -> dict[str, Path]:
    """Generate (once) and return {stage: shard folder} (the `test` split's JSON is
    `test.json` beside `images/`). Deterministic for a seed."""
    cache = Path(cache_dir)
    marker = cache / "done.json"
    stamp = {"version": VERSION, "samples_per_image": samples_per_image,
             "image_size": image_size, "seed": seed, "held_out": held_out}
    folders = shard_folders(cache)
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folders
    if not 0 < held_out < samples_per_image:
        raise ValueError(f"held_out={held_out}: must leave training samples of the "
                         f"{samples_per_image} per image, and hold at least one out")
    (cache / "images").mkdir(parents=True, exist_ok=True)
    per_stage = {s: [] for s in STAGES}
    for k, m in enumerate(CATALOGUE):
        source = m.load()
        rng = np.random.default_rng([seed, k])
        for n in range(samples_per_image):
            name = f"{m.name}_{n:03d}.png"
            _augment(source, rng, image_size).save(cache / "images" / name)
            records = _records(m, name, f"{m.name}-{n}", rng)
            if n >= samples_per_image - held_out:
                per_stage["test"] += records["stage3"]
                continue
            for stage, record in records.items():
                if stage != "router" or m.modality in ROUTER_MODALITIES:
                    per_stage[stage] += record if isinstance(record, list) else [record]
    for stage, records in per_stage.items():
        order = np.random.default_rng([seed, 99]).permutation(len(records))
        path = cache / f"{stage}.json"
        path.write_text(json.dumps([records[i] for i in order], indent=1))
        write_shards(load_json_records(path), folder_reader(cache / "images"), folders[stage],
                     samples_per_shard=200, total=len(records), prefix=stage,
                     show_progress=show_progress, overwrite=True)  # the cache is ours
    marker.write_text(json.dumps(stamp))
    return folders


def corpus(cache_dir) -> list[str]:
    """Every text of the demo, for training its tokenizer."""
    lines = []
    for stage in STAGES[:-1]:  # not the held-out test split
        for record in json.loads((Path(cache_dir) / f"{stage}.json").read_text()):
            lines += [t["value"].replace("<image>", "") for t in record["conversations"]]
    from medmoe_mcore.conventions import SYSTEM_PROMPT

    return lines + [SYSTEM_PROMPT, "USER: ASSISTANT:"]
