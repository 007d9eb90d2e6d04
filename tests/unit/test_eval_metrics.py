"""The Med-VQA metrics pinned on hand-computed examples (LLaVA-Med's definitions), and
scoring joined by id."""

import json

import pytest

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.eval.metrics import closed_scores, open_scores
from medmoe_mcore.eval.normalize import normalize_answer
from medmoe_mcore.eval.scoring import gold_items, join, prediction_items, score


@pytest.mark.parametrize("text,expected", [
    ("The Left Lung.", "left lung"),            # articles, case, final period
    ("two nodules", "2 nodules"),               # number words
    ("none", "0"),
    ("it isnt", "it isn't"),                    # contractions
    ("left-sided, (small)", "left sided small"),  # marks not touching a space -> space
    ("right , left", "right left"),              # "," touching a space: deleted everywhere
    ("1,000 cells", "1000 cells"),               # a digit comma digit: marks deleted
    ("3.5 cm.", "3.5 cm"),                       # a decimal point stays
    ("", ""),
])
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_open_scores_by_hand():
    s = open_scores("left lung", "The left lung")
    assert (s["recall"], s["precision"], s["f1"], s["exact_match"]) == (1.0, 1.0, 1.0, 1.0)
    s = open_scores("left upper lobe", "left lobe of the lung")  # pred words: left lobe of lung
    assert s["precision"] == pytest.approx(2 / 4) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert s["exact_match"] == pytest.approx(2 / 4)  # reference words found / prediction words
    # BLEU-1 as the authors: raw lower-cased words, 2 of 5 match, no brevity penalty (5 > 3);
    # ours on the normalised words (the article gone): 2 of 4
    assert s["bleu_1"] == pytest.approx(2 / 5)
    assert s["bleu_1_normalized"] == pytest.approx(2 / 4)
    empty = open_scores("two", "")
    assert all(v == 0.0 for v in empty.values())
    assert open_scores("two", "2")["recall"] == 1.0


def _authors_bleu(gold: str, prediction: str) -> dict:
    """BLEU as the authors' run_eval.py computes the paper's figures, written out: nltk's
    sentence_bleu on the raw strings lower-cased and split on whitespace, smoothing method 1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    weights = {"bleu_1": (1, 0, 0, 0), "bleu_2": (0, 1, 0, 0), "bleu_3": (0, 0, 1, 0)}
    return {k: sentence_bleu([gold.lower().split()], prediction.lower().split(), weights=w,
                             smoothing_function=SmoothingFunction().method1)
            for k, w in weights.items()}


@pytest.mark.parametrize("gold,prediction", [
    ("Pleural effusion.", "There is a pleural effusion, on the left."),
    ("left upper lobe", "The Left upper-lobe (LUL)!"),
    ("2 nodules", "two nodules are seen in the right lung"),
])
def test_bleu_is_the_authors_and_normalised_bleu_is_extra(gold, prediction):
    ours = open_scores(gold, prediction)
    theirs = _authors_bleu(gold, prediction)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    # punctuation and number words make the normalised variant differ: both are reported
    assert any(ours[k + "_normalized"] != pytest.approx(v) for k, v in theirs.items())


def test_closed_scores_substring_and_strict():
    assert closed_scores("yes", "Yes, it is.") == {"correct": 1.0, "strict": 1.0}
    assert closed_scores("no", "no, yes") == {"correct": 1.0, "strict": 0.0}
    assert closed_scores("yes", "no, yes") == {"correct": 1.0, "strict": 0.0}
    assert closed_scores("no", "yes") == {"correct": 0.0, "strict": 0.0}
    assert closed_scores("liver", "the liver") == {"correct": 1.0, "strict": 1.0}
    assert closed_scores("liver", "liver and spleen")["strict"] == 0.0


def _files(tmp_path, predictions):
    gold = [{"id": i, "conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": a}],
             "answer_type": t, "modality": m}
            for i, a, t, m in ((1, "yes", "CLOSED", "CT"), (2, "left lung", "OPEN", "CT"),
                               (3, "no", "close", "MRI"), (4, "two", "open", "MRI"))]
    (tmp_path / "gold.json").write_text(json.dumps(gold))
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(p) for p in predictions))
    return gold_items(tmp_path / "gold.json"), prediction_items(tmp_path / "pred.jsonl")


PREDICTIONS = [{"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "the left lung"},
               {"question_id": 3, "text": "yes"}, {"question_id": 4, "text": "2"}]


def test_scores_are_joined_by_id_not_by_order(tmp_path):
    ordered = score(join(*_files(tmp_path, PREDICTIONS))[0])
    shuffled = score(join(*_files(tmp_path, PREDICTIONS[::-1]))[0])
    assert ordered == shuffled
    assert ordered["closed_accuracy"] == 50.0 and ordered["open_recall"] == 100.0
    assert (ordered["num_open"], ordered["num_closed"]) == (2, 2)
    assert ordered["per_dataset"]["gold"]["closed_accuracy"] == 50.0


def test_missing_duplicate_and_unknown_ids_are_named(tmp_path):
    gold, preds = _files(tmp_path, PREDICTIONS[:3])
    with pytest.raises(ConfigError, match=r"no prediction for ids \['4'\]"):
        join(gold, preds)
    joined, missing = join(gold, preds, allow_missing=True)
    assert missing == ["4"] and len(joined) == 3
    with pytest.raises(ConfigError, match=r"not in the gold file: \['9'\]"):
        join(*_files(tmp_path, PREDICTIONS + [{"question_id": 9, "text": "x"}]))
    with pytest.raises(ConfigError, match=r"duplicate ids \['1'\]"):
        _files(tmp_path, PREDICTIONS + [{"question_id": 1, "text": "x"}])


def test_score_tool_prints_the_figures_last(tmp_path, capsys):
    from tools.evaluate import main

    _files(tmp_path, PREDICTIONS)
    assert main(["score", "--gold", str(tmp_path / "gold.json"), "--predictions",
                 str(tmp_path / "pred.jsonl"), "--report", str(tmp_path / "r.json")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"closed_accuracy", "open_recall", "open_f1", "open_exact_match", "bleu_1",
            "bleu_2", "bleu_3", "num_closed", "num_open", "per_dataset"} <= set(last)
    assert json.loads((tmp_path / "r.json").read_text())["groups"]


@pytest.mark.parametrize("prediction,expected", [
    ("Pneumonia.", "pneumonia"),
    ("The image shows a normal chest.", "normal"),
    ("normal or pneumonia", "(none)"),          # two labels named: wrong
    ("I cannot tell", "(none)"),
    ("left lung", "left lung"),                 # the longer label wins over "lung"
])
def test_label_matching_rule(prediction, expected):
    from medmoe_mcore.eval.classification import predicted_label

    labels = ["normal", "pneumonia"] if "lung" not in prediction else ["lung", "left lung"]
    assert predicted_label(prediction, labels) == expected


def test_classification_report_and_confusion(tmp_path):
    gold = [{"id": i, "answer": a, "labels": ["normal", "pneumonia"], "dataset": "pneumonia"}
            for i, a in enumerate(["normal", "normal", "pneumonia", "pneumonia"])]
    (tmp_path / "gold.jsonl").write_text("\n".join(json.dumps(g) for g in gold))
    preds = [{"id": i, "prediction": p} for i, p in
             enumerate(["normal", "pneumonia", "pneumonia", "normal and pneumonia"])]
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    report = score(join(gold_items(tmp_path / "gold.jsonl"),
                        prediction_items(tmp_path / "pred.jsonl"))[0])
    c = report["classification"]["pneumonia"]
    assert c["accuracy"] == 50.0 and report["classification_accuracy"] == 50.0
    assert c["per_class"] == {"normal": 50.0, "pneumonia": 50.0}
    assert c["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 1]]
    assert report["num_closed"] == report["num_open"] == 0


def test_test_file_problems_are_named_before_any_model(tmp_path):
    from medmoe_mcore.eval.predict import test_questions

    records = [{"id": "a", "image": "missing.png", "answer_type": "OPEN",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                  {"from": "gpt", "value": "x"}]}]
    (tmp_path / "t.json").write_text(json.dumps(records))
    with pytest.raises(ConfigError, match=r"id a: image .*missing\.png not found"):
        test_questions(tmp_path / "t.json")
    (tmp_path / "missing.png").write_bytes(b"")
    questions, gold = test_questions(tmp_path / "t.json")
    assert questions[0].question == "What?" and gold["a"]["answer"] == "x"


def test_test_data_outside_the_image_folder_shards_and_prompt_styles(tmp_path):
    from medmoe_mcore.data.records import write_shards
    from medmoe_mcore.eval.predict import test_questions

    def record(qid, image, kind):
        return {"id": qid, "image": image, "answer_type": kind, "conversations": [
            {"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"}]}

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    for bad in ("../secret.png", str(tmp_path / "secret.png")):
        (tmp_path / "t.json").write_text(json.dumps([record("a", bad, "CLOSED")]))
        with pytest.raises(ConfigError, match="id a: image .* is outside the image folder"):
            test_questions(tmp_path / "t.json", tmp_path / "images")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    records = [record("c", "ok.png", "CLOSED"), record("o", "ok.png", "OPEN")]
    (tmp_path / "t.json").write_text(json.dumps(records))
    questions, _ = test_questions(tmp_path / "t.json", tmp_path / "images", "short-answer")
    assert [q.question for q in questions] == ["Is it?\nAnswer with yes or no",
                                              "Is it?\nAnswer with a single word or short phrase"]
    with pytest.raises(ConfigError, match="--prompt-style 'x'"):
        test_questions(tmp_path / "t.json", tmp_path / "images", "x")
    write_shards(records, lambda r: (tmp_path / "images" / r["image"]).read_bytes(),
                 tmp_path / "shards", show_progress=False)
    from_shards, gold = test_questions(tmp_path / "shards")
    assert [q.id for q in from_shards] == ["c", "o"] and gold["o"]["answer_type"] == "open"
    assert from_shards[0].image_bytes is not None and from_shards[0].load_image().size == (8, 8)
    with pytest.raises(ConfigError, match="shards .* carry their images"):
        test_questions(tmp_path / "shards", tmp_path / "images")
