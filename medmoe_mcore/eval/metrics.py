"""Per-question Med-VQA metrics with the definitions of LLaVA-Med's scorer (which the authors'
evaluation runs), computed on (gold answer, prediction) pairs; BLEU by nltk.

Open questions (both texts normalised as theirs: lower case, `normalize_answer`, applied
twice as their scorer does): precision, recall and F1 over word counts; their "exact match"
= distinct reference words found in the prediction / prediction word count. BLEU-1/2/3 as
their `run_eval.py` computes the paper's figures: `sentence_bleu` on the raw texts, lower-cased
and split on whitespace (punctuation kept: "effusion." and "effusion" differ), weights (1,0,0,0),
(0,1,0,0), (0,0,1,0), smoothing method 1; `bleu_*_normalized` (ours) is the same on the
normalised texts. Closed questions: correct when the gold answer is a substring of the
prediction (theirs; "no, yes" counts as both), plus a strict rule (ours): for a yes/no gold,
the prediction says exactly one of yes/no and it is the gold; otherwise the normalised
prediction equals the normalised gold.
"""

from __future__ import annotations

from collections import Counter

from medmoe_mcore.eval.normalize import normalize_answer

BLEU_WEIGHTS = {"bleu_1": (1, 0, 0, 0), "bleu_2": (0, 1, 0, 0), "bleu_3": (0, 0, 1, 0)}
NORMALIZED = "_normalized"
BLEU_FIGURES = (*BLEU_WEIGHTS, *(name + NORMALIZED for name in BLEU_WEIGHTS))


def _bleu(gold_words: list[str], predicted_words: list[str], suffix: str = "") -> dict:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method1
    return {name + suffix: sentence_bleu([gold_words], predicted_words, weights=w,
                                         smoothing_function=smoothing)
            if predicted_words else 0.0 for name, w in BLEU_WEIGHTS.items()}


def _prepared(gold: str, prediction: str) -> tuple[str, str]:
    return normalize_answer(gold.lower()), normalize_answer(prediction.lower())


def open_scores(gold: str, prediction: str) -> dict[str, float]:
    """Fractions in [0, 1] for one open question."""
    bleu = _bleu(gold.lower().split(), prediction.lower().split())
    gold, prediction = _prepared(gold, prediction)
    ref = Counter(normalize_answer(gold).split())
    hyp = Counter(normalize_answer(prediction).split())
    shared = sum(n for w, n in hyp.items() if w in ref)  # their tp counts the prediction's
    missed = sum(n for w, n in ref.items() if w not in hyp)
    if not hyp or not ref or shared == 0:
        precision = recall = f1 = 0.0
    else:
        precision, recall = shared / sum(hyp.values()), shared / (shared + missed)
        f1 = 2 * precision * recall / (precision + recall)
    exact = sum(1 for w in ref if w in hyp) / sum(hyp.values()) if hyp else 0.0
    bleu.update(_bleu(gold.split(), prediction.split(), NORMALIZED))
    return {"recall": recall, "precision": precision, "f1": f1, "exact_match": exact, **bleu}


def closed_scores(gold: str, prediction: str) -> dict[str, float]:
    """{"correct": substring rule, "strict": one clear answer} for one closed question."""
    gold, prediction = _prepared(gold, prediction)
    words = prediction.split()
    if gold in ("yes", "no"):
        said = {w for w in words if w in ("yes", "no")}
        strict = said == {gold}
    else:
        strict = prediction == gold
    return {"correct": float(gold in prediction), "strict": float(strict)}
