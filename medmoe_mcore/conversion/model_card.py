"""A release folder's model card (README.md), ready for the Hugging Face hub: the metadata
header written by huggingface_hub's `ModelCardData` (license, base models, datasets, tags,
pipeline tag, and the evaluation results as `model-index`), then what the model is, how to run
it with transformers, the evaluation table (`tools/evaluate.py score --report`'s JSON), the
training stages from the checkpoint's history (training/history.py), and intended use and
limitations."""

from __future__ import annotations

import json
from pathlib import Path

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.models.parameters import expected

# The released weights derive from these; their licenses carry over.
BASE_MODELS = {"phi": "microsoft/phi-2", "stablelm": "stabilityai/stablelm-2-1_6b"}
VISION_BASE = "openai/clip-vit-large-patch14-336"
LICENSES = {"phi": "mit", "stablelm": "other"}  # Phi-2: MIT; StableLM 2: Stability AI's own
TAGS = ["medical", "vision-language", "mixture-of-experts", "med-moe", "llava", "megatron-core",
        "medmoe-mcore"]
# (report key, what the table calls it, the model-index metric type)
FIGURES = (("closed_accuracy", "closed accuracy", "accuracy"),
           ("open_recall", "open recall", "recall"),
           ("open_f1", "open F1", "f1"),
           ("bleu_1", "BLEU-1", "bleu"))

LIMITATIONS = """\
## Intended use and limitations

- **Research only. This model is not a medical device** and has not been cleared or approved
  by any regulator. It must not be used for diagnosis, treatment, triage or any other clinical
  decision, nor shown to patients as medical advice.
- Its answers can be wrong while sounding confident (hallucinated findings, wrong laterality,
  wrong modality); the figures above are on public benchmark test sets, which are small and
  differ from any hospital's images, scanners, populations and language.
- It reads one image at 336 x 336 pixels: fine detail, volumes (CT/MR series) and prior
  studies are not seen. It answers in English.
- The training data's biases (sources, populations, modalities) carry into the answers.
- Use it to study medical vision-language models and mixture-of-experts training, with a
  qualified person checking any output that matters.
"""


def read_eval_report(path) -> dict:
    """The JSON `tools/evaluate.py score --report` writes, checked for what the card reads."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--eval-report {path}: cannot read it ({e})") from e
    if not isinstance(report, dict) or not isinstance(report.get("per_dataset"), dict):
        raise ConfigError(f"--eval-report {path}: not a report of `tools/evaluate.py score "
                          "--report` (no per_dataset table)")
    return report


def _eval_rows(report: dict) -> list[tuple[str, str, int, dict]]:
    """(dataset, kind, n, {figure: value}) per dataset: Med-VQA and classification."""
    rows = [(name, "VQA", r.get("num_open", 0) + r.get("num_closed", 0),
             {key: r.get(key) for key, _, _ in FIGURES})
            for name, r in sorted(report["per_dataset"].items())]
    rows += [(name, "classification", r.get("num", 0), {"accuracy": r.get("accuracy")})
             for name, r in sorted((report.get("classification") or {}).items())]
    return rows


def _eval_results(report: dict) -> list:
    from huggingface_hub import EvalResult

    out = []
    for name, kind, _, figures in _eval_rows(report):
        for key, value in figures.items():
            if value is None:
                continue
            metric = dict((k, m) for k, _, m in FIGURES).get(key, "accuracy")
            out.append(EvalResult(
                task_type="visual-question-answering" if kind == "VQA"
                else "image-classification", dataset_type=name, dataset_name=name,
                metric_type=metric, metric_name=key.replace("_", " "),
                metric_value=round(float(value), 2)))
    return out


def _evaluation(report: dict) -> list[str]:
    def pct(x):
        return "-" if x is None else f"{x:.2f}"
    lines = ["## Evaluation", "", "Scored by id with `tools/evaluate.py score` (closed: yes/no "
             "accuracy; open: token recall and F1, BLEU as the authors' `run_eval.py`), in %:",
             "", "| dataset | kind | n | " + " | ".join(t for _, t, _ in FIGURES) +
             " | accuracy |", "|---|---|---:|" + "---:|" * (len(FIGURES) + 1)]
    for name, kind, n, figures in _eval_rows(report):
        cells = [pct(figures.get(key)) for key, _, _ in FIGURES] + [pct(figures.get(
            "accuracy"))]
        lines.append(f"| {name} | {kind} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _training(stages: list[dict]) -> list[str]:
    lines = ["## Training", ""]
    if not stages:
        return lines + ["The checkpoint carries no training history (it was imported, or "
                        "saved before histories were kept).", ""]
    lines += ["Trained with medmoe-mcore on Megatron-Core, stage by stage (1: the projector; "
              "2: the projector and the language model; 3: the experts, the meta expert and "
              "the dense FFNs):", "",
              "| stage | iterations | samples | global batch | seq length | lr (min) | "
              "schedule (warm-up) | weight decay | optimizer | precision | data |",
              "|---:|---:|---:|---:|---:|---|---|---:|---|---|---|"]
    for s in stages:
        data = ", ".join(f"{name} ({weight:.2f})" for name, weight in s["datasets"])
        lines.append(
            f"| {s['stage']} | {s['iterations']} | {s['consumed_samples']} | "
            f"{s['global_batch_size']} | {s['seq_length']} | {s['lr']:g} ({s['min_lr']:g}) | "
            f"{s['lr_decay_style']} ({s['lr_warmup_iters']} it) | {s['weight_decay']:g} | "
            f"{s['optimizer']} | {s['precision']} | {data} |")
    return lines + [""]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _what(cfg: ModelConfig) -> list[str]:
    lm, v, moe = cfg.language, cfg.vision, cfg.moe
    counts = expected(cfg)
    lines = ["Med-MoE (Jiang et al., arXiv 2404.10237): a medical vision-language model. A CLIP "
             f"vision tower ({v.num_layers} layers run, {v.image_size} px, {v.num_patches} "
             f"image tokens), a 2-layer GELU projector and a {lm.family} language model "
             f"({lm.num_layers} layers, hidden {lm.hidden_size}, vocabulary "
             f"{lm.vocab_size}).", ""]
    if moe is not None:
        layers = [i for i, on in enumerate(moe.moe_layers(lm.num_layers)) if on]
        domains = f" ({', '.join(moe.modalities)})" if moe.modalities else ""
        lines += [f"Layers {', '.join(map(str, layers))} are mixture-of-experts layers: "
                  f"{moe.num_experts} domain experts{domains}, {moe.router_topk} chosen per "
                  f"token by a fixed, pretrained modality router, plus an always-on meta "
                  f"expert.", ""]
    lines += [f"Parameters: {_count(counts['total'])} in all, {_count(counts['active'])} "
              "active per token.", ""]
    return lines


USAGE = """\
## How to use

```python
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

folder = "{repo}"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}},
             {{"type": "text", "text": "Is there a pleural effusion?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("chest_xray.png").convert("RGB"), text=prompt,
                   return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The model code ships in this folder (`trust_remote_code`; read it before running it). The same
weights load in the authors' MoE-LLaVA code (their layout and config keys).
"""


def model_card(cfg: ModelConfig, name: str, stages: list[dict], report: dict | None = None,
               datasets: list[str] | None = None, license: str | None = None,
               extra: list[str] = ()) -> str:
    """README.md text of a release folder named `name`. `datasets` (hub ids) default to the
    names of the folders the stages trained on; `extra` are sections of the exporter's own
    (divergences from the authors' code, a LoRA base)."""
    from huggingface_hub import ModelCard, ModelCardData

    family = cfg.language.family
    datasets = datasets or sorted({d for s in stages for d, _ in s["datasets"]}) or None
    data = ModelCardData(
        license=license or LICENSES[family], base_model=[BASE_MODELS[family], VISION_BASE],
        datasets=datasets, tags=TAGS, pipeline_tag="image-text-to-text",
        library_name="transformers", model_name=name,
        eval_results=_eval_results(report) if report else None)
    body = [f"# {name}", "", *_what(cfg), USAGE.format(repo=name), ""]
    body += _evaluation(report) if report else []
    body += _training(stages) + [LIMITATIONS] + list(extra)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")
    return str(card)
