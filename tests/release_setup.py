"""Questions on real medical images, and the answers of a release folder through plain
`transformers` (AutoModelForCausalLM + AutoProcessor with trust_remote_code), for comparing
with tools/generate.py."""

import json
from pathlib import Path

# (image of the catalogue, file written, question): a DICOM file, a PNG and a JPEG, a text-only
# question, and questions of different lengths (one batch mixes prompt lengths and kinds).
QUESTIONS = (
    ("RG1_UNCI", None, "What modality is this?"),
    ("immunohistochemistry", "ihc.png",
     "Is there an abnormality in the left lung field of this image, and where is it?"),
    ("MR2_UNCI", "mr.jpg", "Which organ is shown?"),
    (None, None, "What does the abbreviation CT stand for?"),  # a text-only question
)


def write_questions(folder) -> Path:
    """A JSONL question file beside its images."""
    from pydicom.data import get_testdata_file

    from medmoe_mcore.demo.medical_images import BY_NAME

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (name, file, question) in enumerate(QUESTIONS):
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
        content = [{"type": "text", "text": q["question"]}]
        if q["image"] is not None:
            content.insert(0, {"type": "image"})
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        if q["image"] is None:  # a text-only question
            inputs = processor(text=text, return_tensors="pt").to(device)
        else:
            image = load_image(q["image"] if Path(q["image"]).is_absolute()
                               else folder / q["image"])
            inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tokens[0, inputs["input_ids"].shape[1]:].tolist())
    return out
