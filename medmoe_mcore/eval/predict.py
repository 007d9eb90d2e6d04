"""Test records -> questions for the decoder -> one prediction record per question.

The prompt is the record's first user turn as written (the authors' test files carry their
per-question-type instructions in it), behind the image; decoding is greedy unless sampling is
asked for, so predictions are the same at every TP/EP/DP layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from medmoe_mcore.config import ConfigError
from medmoe_mcore.conventions import IMAGE_TOKEN
from medmoe_mcore.eval.scoring import gold_items, read_records
from medmoe_mcore.inference.questions import Question


def test_questions(path, image_folder=None) -> tuple[list[Question], dict]:
    """(questions in file order, gold items by id) of a LLaVA-format test file."""
    gold = gold_items(path)
    folder = Path(image_folder) if image_folder else Path(path).parent
    questions, problems = [], []
    for r in read_records(path):
        qid = str(r.get("id", r.get("question_id")))
        turns = r.get("conversations") or []
        text = turns[0].get("value") if turns else r.get("question", r.get("text"))
        image = folder / str(r.get("image", ""))
        if not isinstance(text, str) or not r.get("image"):
            problems.append(f"id {qid}: needs a question and an image")
        elif not image.is_file():
            problems.append(f"id {qid}: image {image} not found")
        else:
            questions.append(Question(len(questions), qid,
                                      text.replace(IMAGE_TOKEN, "").strip(), str(image)))
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems[:10]))
    return questions, gold


def write_predictions(answers: list[dict], gold: dict, path) -> None:
    """One JSON line per question: id, question, answer (gold), prediction, answer_type,
    modality, dataset (+ labels for classification)."""
    with open(path, "w") as f:
        for a in answers:
            item = gold[str(a["id"])]
            record = {"id": a["id"], "question": a["question"], "answer": item["answer"],
                      "prediction": a["answer"], "answer_type": item["answer_type"],
                      "modality": item["modality"], "dataset": item["dataset"]}
            if item["labels"]:
                record["labels"] = item["labels"]
            f.write(json.dumps(record) + "\n")
