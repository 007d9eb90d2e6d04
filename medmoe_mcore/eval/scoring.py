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
from medmoe_mcore.eval.metrics import BLEU_FIGURES, closed_scores, open_scores

ANSWER_TYPES = {"open": "open", "closed": "closed", "close": "closed"}
# Overall figures (percentages) and the per-question score each averages.
OPEN_FIGURES = {"open_recall": "recall", "open_precision": "precision", "open_f1": "f1",
                "open_exact_match": "exact_match", **{b: b for b in BLEU_FIGURES}}
CLOSED_FIGURES = {"closed_accuracy": "correct", "closed_strict_accuracy": "strict"}


def _decoded_lines(path: Path, data: bytes, skipped: Counter | None):
    """(line number, text) of each non-blank line; a line of bad UTF-8 is named (or skipped)."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _problem(f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line)", "not_utf8",
                     skipped)
            continue
        if line.strip():
            yield n, line


def _problem(message: str, reason: str, skipped: Counter | None) -> None:
    """Stop on an unreadable record, or count it by reason where records may be skipped."""
    if skipped is None:
        raise ConfigError(message)
    skipped[reason] += 1


def read_records(path, skipped: Counter | None = None) -> list[dict]:
    """The objects of a JSON list or JSON lines file. A record that cannot be read (bad UTF-8,
    not JSON, not an object) stops the read naming the file and line, or, given `skipped`, is
    counted there by reason and left out (a JSON list is all or nothing)."""
    path = Path(path)
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: not a JSON list ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
        numbered = list(enumerate(records if isinstance(records, list) else [records], 1))
        where = "record"
    else:
        numbered, where = [], "line"
        for n, line in _decoded_lines(path, data, skipped):
            try:
                numbered.append((n, json.loads(line)))
            except (ValueError, RecursionError) as e:
                _problem(f"{path}:{n}: not JSON ({type(e).__name__}: {str(e)[:200]})",
                         "not_json", skipped)
    out = []
    for n, record in numbered:
        if isinstance(record, dict):
            out.append(record)
        else:
            _problem(f"{path} {where} {n}: a {type(record).__name__}, not a JSON object",
                     "not_an_object", skipped)
    return out


def _id(record: dict):
    """The record's question id as a string, None when absent or not a string/integer."""
    qid = record.get("id", record.get("question_id"))
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return None
    return str(qid)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _answer(record: dict) -> str | None:
    """`answer`, else the first assistant turn of `conversations`."""
    if "answer" in record:
        return _text(record["answer"])
    turns = record.get("conversations")
    if isinstance(turns, list) and len(turns) > 1 and isinstance(turns[1], dict):
        return _text(turns[1].get("value"))
    return None


def gold_items(path, records: list[dict] | None = None) -> dict[str, dict]:
    """id -> {answer, answer_type, modality, dataset, labels} of the file's records (or of
    `records` read from `path`); unreadable records, duplicates and gaps are refused."""
    items, problems = {}, []
    for n, r in enumerate(read_records(path) if records is None else records, 1):
        qid, answer = _id(r), _answer(r)
        kind = ANSWER_TYPES.get(str(r.get("answer_type", "")).lower())
        labels = r.get("labels")
        extras = [k for k in ("modality", "dataset") if r.get(k) is not None
                  and not isinstance(r[k], str)]
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                problems.append(f"record {n}: labels must be a list of strings")
                continue
            kind = "classification"
            if answer not in labels:
                problems.append(f"record {n}: answer {answer!r} is not one of its labels")
                continue
        if qid is None or answer is None or kind is None:
            problems.append(f"record {n}: needs an id (string or integer), an answer string "
                            "and answer_type open/closed")
        elif extras:
            problems.append(f"record {n}: {', '.join(extras)} must be strings")
        elif qid in items:
            problems.append(f"record {n}: duplicate id {qid!r}")
        else:
            items[qid] = {"answer": answer, "answer_type": kind,
                          "modality": r.get("modality") or "-",
                          "dataset": r.get("dataset") or Path(path).stem, "labels": labels}
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems[:10]))
    return items


def prediction_items(path, skipped: Counter | None = None) -> dict[str, str]:
    """id -> prediction text (ours: `id`, `prediction`; LLaVA's: `question_id`, `text`).
    Unreadable records stop the read, or with `skipped` are counted and left out."""
    out, duplicates = {}, []
    for n, r in enumerate(read_records(path, skipped), 1):
        qid, text = _id(r), _text(r.get("prediction", r.get("text")))
        if qid is None or text is None:
            _problem(f"{path} record {n}: needs an id (string or integer) and a 'prediction' "
                     "(or 'text') string", "no_id_or_prediction", skipped)
            continue
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
    skipped = Counter() if allow_missing else None
    joined, missing = join(gold_items(gold_path), prediction_items(predictions_path, skipped),
                           allow_missing)
    return {**score(joined), "num_missing": len(missing), "missing_ids": missing,
            "unreadable_predictions": dict(skipped or {})}


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
