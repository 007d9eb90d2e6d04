"""tools/scaling_study.py end to end on the main job's output: a 2 x 2 sweep (E in {2, 4},
top-k in {1, 2}) at EP = 2 on 2 processes, its files, and resuming."""

import csv
import json

from tests.conftest import run_tool


def test_scaling_study_2x2_on_the_demo(tmp_path, main_job):
    assert main_job["run"].returncode == 0, main_job["run"].stderr[-3000:]
    study = tmp_path / "study"
    args = ("tools/scaling_study.py", "--demo-dir", str(main_job["work_dir"]),
            "--study-dir", str(study), "--num-experts", "2", "4", "--moe-router-topk", "1", "2",
            "--expert-model-parallel-size", "2", "--nproc-per-node", "2",
            "--train-iters", "3", "--lr", "1e-3", "--num-workers", "0")
    r = run_tool(*args, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(study / "study.csv")))
    assert [(row["num_experts"], row["topk"]) for row in rows] == \
        [("2", "1"), ("4", "1"), ("2", "2"), ("4", "2")]
    results = json.loads((study / "study.json").read_text())["points"]
    for result in results:
        assert result["parameters_checked_on_model"]  # counted == formula, or the point fails
        assert len(result["losses"]) == 3 and len(result["peak_memory_bytes"]) == 2
        assert result["expert_balance"]["per_ep_rank_max_over_mean"]["mean"] >= 1.0
        assert len(result["expert_tokens"][0]) == result["num_experts"]
        assert result["scores"]["num_closed"] + result["scores"]["num_open"] > 0
        assert result["validation"] and result["router"]["experts"]
    assert (study / "study.png").stat().st_size > 10_000
    assert (study / "study.md").read_text().startswith("| Experts | Top-k |")
    # resumable: finished points are skipped; a missing result reruns that point only
    again = run_tool(*args, "--print-commands")
    assert "4 points, 4 done, 0 to run" in again.stdout and "torchrun" not in again.stdout
    (study / "points" / "E4-top2-modality-meta-ep2" / "result.json").unlink()
    again = run_tool(*args, "--print-commands")
    commands = [line for line in again.stdout.splitlines() if line.startswith("torchrun")]
    assert len(commands) == 1 and commands[0].endswith("--point E4-top2-modality-meta-ep2")


def test_scaling_study_refuses_before_any_compute(tmp_path, main_job):
    work = str(main_job["work_dir"])
    r = run_tool("tools/scaling_study.py", "--demo-dir", work, "--study-dir", str(tmp_path))
    assert r.returncode == 2 and "--train-iters: the stage-3 iterations" in r.stderr
    r = run_tool("tools/scaling_study.py", "--pretrained-checkpoint",
                 str(main_job["work_dir"] / "checkpoints" / "stage2"), "--data-path",
                 str(main_job["work_dir"] / "data" / "shards" / "stage3"), "--train-iters", "2",
                 "--lr", "1e-3", "--study-dir", str(tmp_path))
    assert r.returncode == 2 and "--router-data-path: the modality router" in r.stderr
    r = run_tool("tools/scaling_study.py", "--demo-dir", work, "--study-dir", str(tmp_path),
                 "--train-iters", "2", "--lr", "1e-3", "--num-experts", "3",
                 "--moe-router-topk", "4")
    assert r.returncode == 2 and "the sweep has no valid point" in r.stderr
    assert not any(tmp_path.iterdir())
