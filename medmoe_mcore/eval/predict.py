"""Test records -> questions for the decoder -> one prediction record per question (and, if
asked, the expert activation of the tokens the model routed while answering).

Test data: a LLaVA-format JSON / JSON lines file with images under an image folder (a path
that leads outside it is refused), or shards of tools/prepare_data.py (images inside).
The prompt is the record's first user turn behind the image, plus the prompt style's line
for its answer type (PROMPT_STYLES). Decoding is greedy unless sampling is asked for, so the
predictions are the same at every TP/EP/DP layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conventions import IMAGE_TOKEN
from medmoe_mcore.data.records import read_shards, shard_paths
from medmoe_mcore.eval.scoring import gold_items, read_records
from medmoe_mcore.inference.questions import Question, answer

# What follows the question, by answer type. `authors`: their model_vqa_med.py as released
# (the question as written, for every type); `authors-single-pred`: with their
# --single-pred-prompt; `short-answer`: the two lines their script has commented out
# (LLaVA-1.5's short-answer prompts), one for classification in the same spirit.
PROMPT_STYLES = {
    "authors": {"open": "", "closed": "", "classification": ""},
    "authors-single-pred": dict.fromkeys(
        ("open", "closed", "classification"),
        "\nAnswer with the option's letter from the given choices directly."),
    "short-answer": {"open": "\nAnswer with a single word or short phrase",
                     "closed": "\nAnswer with yes or no",
                     "classification": "\nAnswer with one of the options"},
}


def _is_shards(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".tar"


def test_questions(path, image_folder=None, prompt_style: str = "authors"
                   ) -> tuple[list[Question], dict]:
    """(questions in file order, gold items by id) of a test file or shards; every problem
    is named before any model is built."""
    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"--prompt-style {prompt_style!r}: one of {sorted(PROMPT_STYLES)}")
    path = Path(path)
    if _is_shards(path):
        if image_folder:
            raise ConfigError(f"--image-folder {image_folder}: shards ({path}) carry their "
                              "images")
        pairs = list(read_shards(shard_paths(path)))
    else:
        pairs = [(r, None) for r in read_records(path)]
    records = [r for r, _ in pairs]
    gold = gold_items(path, records)
    folder = (Path(image_folder) if image_folder else path.parent).resolve()
    questions, problems = [], []
    for r, image_bytes in pairs:
        qid = str(r.get("id", r.get("question_id")))
        turns = r.get("conversations", r.get("conversatons")) or []
        first = turns[0] if isinstance(turns, list) and turns else None
        text = first.get("value") if isinstance(first, dict) else r.get("question",
                                                                        r.get("text"))
        if not isinstance(text, str):
            problems.append(f"id {qid}: needs a question")
            continue
        given = r.get("images", r.get("image"))  # a list: several; none: text-only
        names = [str(x) for x in given] if isinstance(given, list) else \
            [str(given)] if given else []
        if image_bytes is None:
            found = [(folder / name).resolve() for name in names]
            outside = [n for n, w in zip(names, found) if not w.is_relative_to(folder)]
            missing = [str(w) for w in found if w.is_relative_to(folder) and not w.is_file()]
            if outside:
                problems.append(f"id {qid}: image {outside[0]!r} is outside the image folder "
                                f"{folder}")
                continue
            if missing:
                problems.append(f"id {qid}: image {missing[0]} not found")
                continue
            names = [str(w) for w in found]
        image = names if isinstance(given, list) else (names[0] if names else None)
        suffix = PROMPT_STYLES[prompt_style][gold[qid]["answer_type"]]
        questions.append(Question(len(questions), qid,
                                  text.replace(IMAGE_TOKEN, "").strip() + suffix, image,
                                  modality=gold[qid]["modality"], image_bytes=image_bytes))
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems[:10]))
    return questions, gold


def predict(model, questions: list[Question], gold: dict, tok, gen, output,
            expert_stats_dir=None, show=None) -> list[dict] | None:
    """Answer every question (a collective of every rank); rank 0 writes the predictions to
    `output` and returns them. With `expert_stats_dir`: expert_activation.csv + .png there."""
    from medmoe_mcore.eval.plots import expert_heatmap
    from medmoe_mcore.models.moe.stats import ExpertActivation

    stats = None
    if expert_stats_dir is not None:
        stats = ExpertActivation(model, sorted({q.modality for q in questions}))
    answers = answer(model, questions, tok, gen, show=show, expert_stats=stats)
    if stats is not None:
        counts = stats.reduce()
        stats.remove()
        if answers is not None:
            folder = Path(expert_stats_dir)
            stats.write_csv(counts, folder / "expert_activation.csv")
            expert_heatmap(counts, stats.layer_numbers, stats.modalities,
                           folder / "expert_activation.png",
                           title="Expert activation while answering (share of tokens)",
                           expert_names=stats.expert_names)
    if answers is not None:
        write_predictions(answers, gold, output)
    return answers


def write_predictions(answers: list[dict], gold: dict, path) -> None:
    """One JSON line per question: id, question, answer (gold), prediction, answer_type,
    modality, dataset (+ labels for classification)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a in answers:
            item = gold[str(a["id"])]
            record = {"id": a["id"], "question": a["question"], "answer": item["answer"],
                      "prediction": a["answer"], "answer_type": item["answer_type"],
                      "modality": item["modality"], "dataset": item["dataset"]}
            if item["labels"]:
                record["labels"] = item["labels"]
            f.write(json.dumps(record) + "\n")
