"""A release folder's model card: huggingface_hub's ModelCard loads its metadata header
(license, base models, datasets, tags, pipeline tag; the evaluation as model-index when a
report of `tools/evaluate.py score` is given), the body carries the evaluation table, the
training stages from the checkpoint's history, how to run it, and that it is not a medical
device; a file that is not a score report is refused naming the flag."""

import json

import pytest

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conversion.release import export_release
from medmoe_mcore.eval.scoring import score
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.history import stage_entry, updated
from tests.demo_setup import make_workspace


def _report(path):
    joined = [(1, dict(dataset="vqa_rad", answer_type="closed", modality="X-Ray",
                       answer="yes"), "yes"),
              (2, dict(dataset="vqa_rad", answer_type="open", modality="CT",
                       answer="left lung"), "the left lung"),
              (3, dict(dataset="organcmnist", answer_type="classification", modality="CT",
                       answer="liver", labels=["liver", "spleen"]), "liver")]
    path.write_text(json.dumps(score(joined)))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_the_release_card_loads_in_huggingface_hub(tmp_path, workspace):
    from huggingface_hub import ModelCard

    # a checkpoint with two stages of history, as a stage-2 save after stage 1 leaves it
    ckpt = tmp_path / "ckpt"
    shutil_copy(workspace["init"], ckpt)
    stages = None
    for stage, lr in ((1, 1e-3), (2, 2e-5)):
        train = TrainConfig(stage=stage, train_iters=10, lr=lr, global_batch_size=16)
        stages = updated(stages, stage_entry(train, 10, 160, [["/data/vqa_rad", 0.75],
                                                             ["/data/slake", 0.25]]))
    (store.resolve(ckpt) / store.TRAINING_STAGES).write_text(stages)
    out = export_release(ckpt, tmp_path / "medmoe-tiny", show_progress=False,
                         eval_report=_report(tmp_path / "report.json"))
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == ["microsoft/phi-2", "openai/clip-vit-large-patch14-336"]
    assert meta["datasets"] == ["slake", "vqa_rad"] and "medical" in meta["tags"]
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("vqa_rad", "accuracy")] == 100.0
    assert results[("organcmnist", "accuracy")] == 100.0
    text = card.text
    assert "not a medical device" in text and "must not be used for diagnosis" in text
    assert "| vqa_rad | VQA | 2 | 100.00 |" in text
    assert "| 1 | 10 | 160 | 16 |" in text and "| 2 | 10 | 160 | 16 |" in text
    assert "trust_remote_code=True" in text and "vqa_rad (0.75)" in text


def test_a_card_without_history_or_report_and_bad_reports(tmp_path, workspace):
    from huggingface_hub import ModelCard

    out = export_release(workspace["init"], tmp_path / "out", show_progress=False,
                         card_datasets=["flaviagiammarino/vqa-rad"], license="apache-2.0")
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["flaviagiammarino/vqa-rad"]
    assert card.data.license == "apache-2.0" and not card.data.eval_results
    assert "carries no training history" in card.text
    (tmp_path / "bad.json").write_text(json.dumps({"closed_accuracy": 50}))
    with pytest.raises(ConfigError, match="--eval-report .*bad.json: not a report"):
        export_release(workspace["init"], tmp_path / "o2", show_progress=False,
                       eval_report=tmp_path / "bad.json")
    assert not (tmp_path / "o2").exists()


def shutil_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
