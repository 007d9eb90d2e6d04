"""Questions on real medical images, and the answers of a release folder through plain
`transformers` (AutoModelForCausalLM + AutoProcessor with trust_remote_code), for comparing
with tools/generate.py."""

import json
from pathlib import Path

# (image of the catalogue, file written, question): a DICOM file, a PNG and a JPEG, a text-only
# question, a question about two images, and questions of different lengths (one batch mixes
# prompt lengths and kinds).
QUESTIONS = (
    ("RG1_UNCI", None, "What modality is this?"),
    ("immunohistochemistry", "ihc.png",
     "Is there an abnormality in the left lung field of this image, and where is it?"),
    ("MR2_UNCI", "mr.jpg", "Which organ is shown?"),
    (None, None, "What does the abbreviation CT stand for?"),  # a text-only question
    (("immunohistochemistry", "MR2_UNCI"), ("prior.png", "current.jpg"),
     "What changed between the two studies?"),  # a question about two images
)


def write_questions(folder) -> Path:
    """A JSONL question file beside its images."""
    from pydicom.data import get_testdata_file

    from medmoe_mcore.demo.medical_images import BY_NAME

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (name, file, question) in enumerate(QUESTIONS):
        if isinstance(name, tuple):
            for one, written in zip(name, file):
                BY_NAME[one].load().save(folder / written)
            lines.append(json.dumps({"id": f"q{n}", "question": question,
                                     "images": list(file)}))
            continue
        if name is None:
            image = None
        elif file is None:
            image = get_testdata_file(f"{name}.dcm")
        else:
            BY_NAME[name].load().save(folder / file)
            image = file
        lines.append(json.dumps({"id": f"q{n}", "question": question, "image": image}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def hf_answers(export_dir, questions_file, max_new_tokens: int, dtype="float32",
               device="cpu") -> list[list[int]]:
    """Greedy new tokens of each question, one `generate` call per question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from medmoe_mcore.data.images import load_image

    model = AutoModelForCausalLM.from_pretrained(
        export_dir, trust_remote_code=True, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    folder = Path(questions_file).parent
    out = []
    for line in Path(questions_file).read_text().splitlines():
        q = json.loads(line)
        names = q.get("images") or ([q["image"]] if q.get("image") else [])
        content = [{"type": "image"}] * len(names) + [{"type": "text", "text": q["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        if not names:  # a text-only question
            inputs = processor(text=text, return_tensors="pt").to(device)
        else:
            images = [load_image(n if Path(n).is_absolute() else folder / n) for n in names]
            inputs = processor(images=images, text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tokens[0, inputs["input_ids"].shape[1]:].tolist())
    return out
