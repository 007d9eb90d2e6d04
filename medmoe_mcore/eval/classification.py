"""MedMNIST-style classification scored from free-text answers.

Matching rule: both texts normalised as the VQA scorer does (eval/normalize.py); a label is
named when its words stand as a contiguous run of words in the prediction; a label inside the
span of a longer named label does not count separately ("left lung" names only "left lung",
not "lung"). The prediction is the one label named; none or two or more named labels is
wrong, and counted in the confusion matrix's "(none)" column.
"""

from __future__ import annotations

from medmoe_mcore.eval.normalize import normalize_answer

NONE = "(none)"


def _spans(words: list[str], label: list[str]) -> list[tuple[int, int]]:
    n = len(label)
    return [(i, i + n) for i in range(len(words) - n + 1) if n and words[i:i + n] == label]


def predicted_label(prediction: str, labels: list[str]) -> str:
    """The one label the prediction names, else NONE."""
    words = normalize_answer(prediction.lower()).split()
    found = {label: _spans(words, normalize_answer(label.lower()).split()) for label in labels}
    spans = [(s, e, label) for label, hits in found.items() for s, e in hits]
    named = {label for s, e, label in spans
             if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)}
    return named.pop() if len(named) == 1 else NONE


def classification_report(pairs: list[tuple[str, str]], labels: list[str]) -> dict:
    """pairs: (gold label, prediction text). Accuracy and per-class accuracy in percent, the
    confusion matrix (rows: gold labels; columns: labels + (none))."""
    columns = [*labels, NONE]
    matrix = [[0] * len(columns) for _ in labels]
    for gold, prediction in pairs:
        matrix[labels.index(gold)][columns.index(predicted_label(prediction, labels))] += 1
    per_class = {label: 100 * row[i] / sum(row) if sum(row) else None
                 for i, (label, row) in enumerate(zip(labels, matrix))}
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"accuracy": 100 * correct / len(pairs) if pairs else None, "num": len(pairs),
            "per_class": per_class, "confusion": {"rows": labels, "columns": columns,
                                                  "matrix": matrix}}
