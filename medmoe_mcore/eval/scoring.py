"""Gold answers and predictions joined **by question id** (never by file order), scored per
question (eval/metrics.py) and averaged per dataset x answer type x modality and overall.

Gold: LLaVA-format test records (a JSON list or JSON lines) with `id`, `conversations` (the
first assistant turn is the answer), `answer_type` (OPEN/open or CLOSED/close/closed), and
optional `modality`, `dataset`; or our prediction files, which carry `answer`. A record with
`labels` (MedMNIST, tools/prepare_data.py) is a classification question instead
(eval/classification.py). Predictions:
our JSON lines (`id`, `prediction`) or LLaVA-style answer files (`question_id`, `text`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.eval.classification import classification_report
from medmoe_mcore.eval.metrics import BLEU_WEIGHTS, closed_scores, open_scores

ANSWER_TYPES = {"open": "open", "closed": "closed", "close": "closed"}
# Overall figures (percentages) and the per-question score each averages.
OPEN_FIGURES = {"open_recall": "recall", "open_precision": "precision", "open_f1": "f1",
                "open_exact_match": "exact_match", **{b: b for b in BLEU_WEIGHTS}}
CLOSED_FIGURES = {"closed_accuracy": "correct", "closed_strict_accuracy": "strict"}


def read_records(path) -> list[dict]:
    """A JSON list or JSON lines; a bad line is named."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e})") from None
    return out


def gold_items(path, records: list[dict] | None = None) -> dict[str, dict]:
    """id -> {answer, answer_type, modality, dataset, labels} of the file's records (or of
    `records` read from `path`); duplicates and gaps are refused."""
    items, problems = {}, []
    for n, r in enumerate(read_records(path) if records is None else records, 1):
        qid = r.get("id", r.get("question_id"))
        answer = r.get("answer")
        if answer is None and isinstance(r.get("conversations"), list):
            answer = next((t.get("value") for t in r["conversations"][1:2]), None)
        kind = ANSWER_TYPES.get(str(r.get("answer_type", "")).lower())
        if isinstance(r.get("labels"), list):
            kind = "classification"
            if answer not in r["labels"]:
                problems.append(f"record {n}: answer {answer!r} is not one of its labels")
                continue
        if qid is None or not isinstance(answer, str) or kind is None:
            problems.append(f"record {n}: needs id, an answer and answer_type open/closed")
        elif str(qid) in items:
            problems.append(f"record {n}: duplicate id {qid!r}")
        else:
            items[str(qid)] = {"answer": answer, "answer_type": kind,
                               "modality": r.get("modality") or "-",
                               "dataset": r.get("dataset") or Path(path).stem,
                               "labels": r.get("labels")}
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems[:10]))
    return items


def prediction_items(path) -> dict[str, str]:
    out, duplicates = {}, []
    for r in read_records(path):
        qid = str(r.get("id", r.get("question_id")))
        text = r.get("prediction", r.get("text"))
        if not isinstance(text, str):
            raise ConfigError(f"{path}: id {qid}: no 'prediction' (or 'text') string")
        if qid in out:
            duplicates.append(qid)
        out[qid] = text
    if duplicates:
        raise ConfigError(f"{path}: duplicate ids {sorted(duplicates)[:20]}")
    return out


def join(gold: dict, predictions: dict, allow_missing: bool = False) -> tuple[list, list]:
    """[(id, gold item, prediction)] and the missing ids; unknown ids always stop."""
    unknown = sorted(set(predictions) - set(gold))
    if unknown:
        raise ConfigError(f"predictions for ids not in the gold file: {unknown[:20]}"
                          f"{' ...' if len(unknown) > 20 else ''} ({len(unknown)})")
    missing = sorted(set(gold) - set(predictions))
    if missing and not allow_missing:
        raise ConfigError(f"no prediction for ids {missing[:20]}{' ...' if len(missing) > 20 else ''}"
                          f" ({len(missing)} of {len(gold)}; --allow-missing scores the rest)")
    return [(q, gold[q], predictions[q]) for q in gold if q in predictions], missing


def _summary(rows: list[tuple[dict, dict]]) -> dict:
    sums, counts = defaultdict(float), Counter()
    for item, scores in rows:
        counts[item["answer_type"]] += 1
        for name, value in scores.items():
            sums[(item["answer_type"], name)] += value
    out = {"num_open": counts["open"], "num_closed": counts["closed"]}
    for kind, figures in (("open", OPEN_FIGURES), ("closed", CLOSED_FIGURES)):
        for figure, name in figures.items():
            out[figure] = 100 * sums[(kind, name)] / counts[kind] if counts[kind] else None
    return out


def _classification(joined: list) -> dict:
    """Per dataset: accuracy, per-class accuracy and confusion matrix."""
    by = defaultdict(list)
    for _, item, prediction in joined:
        if item["answer_type"] == "classification":
            by[(item["dataset"], tuple(item["labels"]))].append((item["answer"], prediction))
    datasets = [d for d, _ in by]
    if len(set(datasets)) != len(datasets):
        raise ConfigError(f"classification datasets with different label lists: {datasets}")
    return {d: classification_report(pairs, list(labels)) for (d, labels), pairs in by.items()}


def score(joined: list) -> dict:
    """Overall figures, `per_dataset`, `groups` (dataset / answer type / modality) and
    `classification` (per dataset)."""
    classification = _classification(joined)
    joined = [j for j in joined if j[1]["answer_type"] != "classification"]
    rows = [(item, (open_scores if item["answer_type"] == "open" else closed_scores)
             (item["answer"], prediction)) for _, item, prediction in joined]
    by = defaultdict(list)
    for item, scores in rows:
        by[("dataset", item["dataset"])].append((item, scores))
        by[("group", (item["dataset"], item["answer_type"], item["modality"]))].append(
            (item, scores))
    correct = sum(r["accuracy"] * r["num"] for r in classification.values())
    total = sum(r["num"] for r in classification.values())
    return {**_summary(rows),
            "classification_accuracy": correct / total if total else None,
            "classification": classification,
            "per_dataset": {k[1]: _summary(v) for k, v in sorted(by.items()) if k[0] == "dataset"},
            "groups": [{"dataset": k[1][0], "answer_type": k[1][1], "modality": k[1][2],
                        **_summary(v)} for k, v in sorted(by.items()) if k[0] == "group"]}


def evaluate_predictions(gold_path, predictions_path, allow_missing: bool = False) -> dict:
    """The full report of a prediction file against a gold file, joined by id."""
    joined, missing = join(gold_items(gold_path), prediction_items(predictions_path),
                           allow_missing)
    return {**score(joined), "num_missing": len(missing), "missing_ids": missing}


def headline(report: dict) -> dict:
    """The report without its long parts (groups, missing ids): the one-line summary."""
    return {k: v for k, v in report.items() if k not in ("groups", "missing_ids")}


def table(report: dict) -> str:
    """A readable table: one row per dataset x answer type x modality."""
    head = f"{'dataset':<16}{'type':<8}{'modality':<12}{'n':>6}{'closed acc':>12}" \
           f"{'strict':>8}{'recall':>8}{'F1':>8}{'exact':>8}{'BLEU-1':>8}"
    lines = [head, "-" * len(head)]

    def pct(x):
        return f"{x:.2f}" if x is not None else "-"
    for g in report["groups"]:
        n = g["num_open"] + g["num_closed"]
        lines.append(f"{g['dataset']:<16}{g['answer_type']:<8}{g['modality']:<12}{n:>6}"
                     f"{pct(g['closed_accuracy']):>12}{pct(g['closed_strict_accuracy']):>8}"
                     f"{pct(g['open_recall']):>8}{pct(g['open_f1']):>8}"
                     f"{pct(g['open_exact_match']):>8}{pct(g['bleu_1']):>8}")
    for dataset, c in report["classification"].items():
        per_class = ", ".join(f"{k} {pct(v)}" for k, v in c["per_class"].items())
        lines.append(f"{dataset:<16}{'labels':<8}{'-':<12}{c['num']:>6}  accuracy "
                     f"{pct(c['accuracy'])} (per class: {per_class})")
    return "\n".join(lines)
