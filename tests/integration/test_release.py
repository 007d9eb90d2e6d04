"""The main job's checkpoints released and asked questions: each stage exports (authors'
layout, our transformers classes) to a folder that `transformers` runs on its own, and its
greedy answers equal tools/generate.py on the Megatron checkpoint at TP1, TP2+SP, TP1xEP2 and
TP2xEP2 (float32, 16 new tokens, one batch mixing prompt lengths, real DICOM/PNG/JPEG
images and a text-only question)."""

import json

import pytest

from tests.conftest import run_tool
from tests.release_setup import QUESTIONS, hf_answers, write_questions

NEW_TOKENS = 16
LAYOUTS = {
    "TP1": (1, ()),
    "TP2+SP": (2, ("--tensor-model-parallel-size", "2", "--sequence-parallel")),
    "TP1xEP2": (2, ("--expert-model-parallel-size", "2")),
    "TP2xEP2": (4, ("--tensor-model-parallel-size", "2", "--sequence-parallel",
                    "--expert-model-parallel-size", "2")),
}
CASES = [("stage1", "TP1"), ("stage2", "TP1"), ("stage2", "TP2+SP"), ("stage3", "TP1"),
         ("stage3", "TP2+SP"), ("stage3", "TP1xEP2"), ("stage3", "TP2xEP2")]


@pytest.fixture(scope="module")
def released(main_job, tmp_path_factory):
    assert main_job["run"].returncode == 0, main_job["run"].stderr[-3000:]
    out = tmp_path_factory.mktemp("release")
    questions = write_questions(out / "questions")
    answers = {}
    for stage in ("stage1", "stage2", "stage3"):
        r = run_tool("tools/convert_mcore_to_hf.py", "--load",
                     str(main_job["work_dir"] / "checkpoints" / stage), "--hf-dir",
                     str(out / stage), "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        for code in ("configuration_medmoe.py", "modeling_medmoe.py"):
            assert "medmoe_mcore" not in (out / stage / code).read_text()  # self-contained
        answers[stage] = hf_answers(out / stage, questions, NEW_TOKENS)
    return {"questions": questions, "answers": answers, "work_dir": main_job["work_dir"],
            "release": out}


@pytest.mark.slow
@pytest.mark.parametrize("stage,layout", CASES)
def test_generate_equals_transformers_on_the_release(released, stage, layout):
    nproc, flags = LAYOUTS[layout]
    r = run_tool("tools/generate.py", "--load",
                 str(released["work_dir"] / "checkpoints" / stage), "--questions",
                 str(released["questions"]), "--max-new-tokens", str(NEW_TOKENS),
                 "--micro-batch-size", "4", *flags, nproc=nproc, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ours = [json.loads(line) for line in r.stdout.strip().splitlines()[-len(QUESTIONS):]]
    assert [a["id"] for a in ours] == [f"q{n}" for n in range(len(QUESTIONS))]
    tokens = [a["tokens"] for a in ours]
    assert all(len(t) == NEW_TOKENS or t[-1] == 0 for t in tokens), tokens
    assert tokens == released["answers"][stage], (tokens, released["answers"][stage])


@pytest.mark.slow
def test_evaluation_is_the_same_at_tp1_tp2xep2_and_from_the_release(released, tmp_path):
    """tools/evaluate.py generate on held-out demo records (VQA and modality classification)
    from the checkpoint at TP1 and TP2xEP2 and from its release folder: the same predictions
    and the same expert activation counts (image and text tokens); then scored."""
    work = released["work_dir"]
    records = json.loads((work / "data" / "test.json").read_text())[:8]
    (tmp_path / "test.json").write_text(json.dumps(records))
    runs = {"TP1": ("--load", work / "checkpoints" / "stage3", *LAYOUTS["TP1"]),
            "TP2xEP2": ("--load", work / "checkpoints" / "stage3", *LAYOUTS["TP2xEP2"]),
            "release": ("--hf-dir", released["release"] / "stage3", *LAYOUTS["TP1"])}
    predictions, stats = {}, {}
    for name, (source, path, nproc, flags) in runs.items():
        out = tmp_path / name
        r = run_tool("tools/evaluate.py", "generate", source, str(path), "--data",
                     str(tmp_path / "test.json"), "--image-folder", str(work / "data" / "images"),
                     "--output", str(out / "pred.jsonl"), "--expert-stats", str(out),
                     "--max-new-tokens", "8", "--micro-batch-size", "3", *flags, nproc=nproc,
                     timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        predictions[name] = (out / "pred.jsonl").read_text()
        # padding rows depend on how questions were batched, which differs with DP
        stats[name] = [line for line in (out / "expert_activation.csv").read_text()
                       .splitlines() if ",padding," not in line]
        assert (out / "expert_activation.png").stat().st_size > 0
    assert predictions["TP1"] == predictions["TP2xEP2"] == predictions["release"]
    assert stats["TP1"] == stats["TP2xEP2"] == stats["release"]
    assert len(predictions["TP1"].splitlines()) == 8
    r = run_tool("tools/evaluate.py", "score", "--gold", str(tmp_path / "test.json"),
                 "--predictions", str(tmp_path / "TP1" / "pred.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    classified = sum(c["num"] for c in figures["classification"].values())
    assert figures["num_open"] + figures["num_closed"] + classified == 8 and classified > 0
