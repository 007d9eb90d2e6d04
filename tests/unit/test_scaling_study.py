"""Scaling-study pieces without processes: the grid, parameter counts against the formula,
load balance figures, the report files."""

import json

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor, medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.models import parameters
from medmoe_mcore.study import report
from medmoe_mcore.study.grid import Point, StudyConfig, points
from medmoe_mcore.study.point import balance


@pytest.mark.parametrize("flavor", ["tiny", "tiny_stablelm"])
def test_parameters_of_the_built_model_equal_the_formula(single_rank, flavor):
    from medmoe_mcore.models.medmoe import MedMoEModel

    study = StudyConfig(num_experts=(2, 4, 8, 16), moe_router_topk=(1, 2),
                        moe_router_type=("modality", "learned"), moe_meta_expert=("on", "off"))
    grid, _ = points(study, language_flavor(flavor))
    assert len(grid) == 32
    dense = ModelConfig(language=medmoe_language(flavor), vision=vision_flavor(flavor, 5))
    configs = [dense] + [ModelConfig(language=dense.language, vision=dense.vision,
                                     moe=p.moe()).validate() for p in grid[::3]]
    for cfg in configs:
        assert parameters.counted(MedMoEModel(cfg), cfg) == parameters.expected(cfg), cfg.moe
    small = parameters.expected(configs[1])
    assert small["total"] > small["active"] > parameters.expected(dense)["total"]


def test_the_grid_leaves_out_what_cannot_run_and_refuses_unknown_values():
    lm = language_flavor("tiny")
    grid, left_out = points(StudyConfig(num_experts=(2, 4), moe_router_topk=(1, 4),
                                        expert_model_parallel_size=(1, 4)), lm)
    assert [p.name for p in grid] == ["E2-top1-modality-meta-ep1", "E4-top1-modality-meta-ep1",
                                      "E4-top1-modality-meta-ep4", "E4-top4-modality-meta-ep1",
                                      "E4-top4-modality-meta-ep4"]
    assert any(line.startswith("E2-top4") and "router_topk" in line for line in left_out)
    assert any(line.startswith("E2-top1-modality-meta-ep4") and "does not divide" in line
               for line in left_out)
    with pytest.raises(ConfigError, match="--moe-meta-expert maybe: each value must be one of"):
        points(StudyConfig(moe_meta_expert=("maybe",)), lm)
    assert Point(4, 2, "learned", True, 1).moe().renormalize
    assert not Point(4, 1, "learned", True, 1).moe().renormalize


def test_load_balance_per_expert_and_per_ep_rank():
    tokens = torch.tensor([[30, 10, 10, 10], [20, 20, 20, 20]])  # [layer, expert]
    b = balance(tokens, ep=2)
    assert b["per_expert_max_over_mean"] == {"worst_layer": 2.0, "mean": 1.5}
    assert b["per_ep_rank_max_over_mean"] == {"worst_layer": 1.333, "mean": 1.167}


def _result(e, k, loss):
    return {"point": f"E{e}-top{k}", "num_experts": e, "topk": k, "router_type": "modality",
            "meta_expert": True, "ep": 1, "parameters": {"total": 10 * e, "active": 5 * k},
            "step_seconds": 0.5 * e, "tokens_per_s": 100.0 / e,
            "peak_memory_bytes": [2 ** 30, 2 ** 31], "losses": [3.0, loss],
            "validation": [[2, loss + 0.1]], "expert_tokens": [[1, 1]],
            "expert_balance": balance(torch.tensor([[3] * e]), 1),
            "scores": {"closed_accuracy": 50.0, "open_recall": 10.0,
                       "classification_accuracy": None}}


def test_report_writes_csv_json_png_and_a_table(tmp_path):
    for e in (2, 4):
        for k in (1, 2):
            folder = tmp_path / "points" / f"E{e}-top{k}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps(_result(e, k, 2.0 - 0.1 * e)))
    rows = report.write(tmp_path, ["E2-top4: left out"])
    assert [r["point"] for r in rows] == ["E2-top1", "E4-top1", "E2-top2", "E4-top2"]
    assert (tmp_path / "study.png").stat().st_size > 10_000
    csv_lines = (tmp_path / "study.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(report.COLUMNS) and len(csv_lines) == 5
    md = (tmp_path / "study.md").read_text()
    assert md.startswith("| Experts | Top-k |") and "| 4 | 2 | modality |" in md
    assert "Left out: E2-top4" in md
    assert json.loads((tmp_path / "study.json").read_text())["left_out"] == ["E2-top4: left out"]
