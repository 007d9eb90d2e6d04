"""tools/bench_gpu.py (the GPU suite): refused on a machine without CUDA before anything runs;
its report reads the figures its parts print (their JSON lines). tools/bench_hf_decode.py, the
suite's decoding part against transformers, on CPU at a tiny size: the same greedy tokens."""

import pytest
import torch

from tools import bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_the_suite_refuses_a_machine_without_cuda(tmp_path, capsys):
    assert bench_gpu.main(["--out", str(tmp_path / "r")]) == 2
    assert "needs a CUDA GPU: torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_report_tables_read_the_parts_output():
    step = ('[medmoe] {"step": "Med-MoE stage 3", "num_experts": 4, "step_s": 0.5, '
            '"tokens_per_s": 16384.0, "flops_all_ranks": 2.0e14, "mfu": 0.404, '
            '"peak_memory_gib_max_rank": 61.2}\nnoise {not json\n'
            '{"num_experts": 4, "time_ratio": 1.2, "flop_ratio": 1.1, '
            '"time_over_flop_ratio": 1.091, "target": "<= 1.15"}')
    decode = ('{"batch": 1, "position": 16, "device_busy_share": 0.5, "kernels_per_step": 900}\n'
              '{"flavor": "phi2", "batch": 1, "ms_per_step": {"16": 10.0}, "tokens_per_s": 100.0}')
    report = {"gpu": "NVIDIA H200", "date": "2026-12-05", "torch": "2.x", "command": "c",
              "open": ["something not measured"],
              "parts": {"step_grouped": {"rc": 0, "results": bench_gpu.json_lines(step)},
                        "decode_profile": {"rc": 0, "results": bench_gpu.json_lines(decode)},
                        "decode_vs_hf_moe": {"rc": "timeout", "results": []},
                        "decode_vs_hf_dense": {"rc": 0, "results": bench_gpu.json_lines(
                            '{"batch": 8, "ours_tokens_per_s": 400.0, "hf_tokens_per_s": 100.0, '
                            '"ours_over_hf": 4.0, "ours_graphs_tokens_per_s": 800.0, '
                            '"ours_graphs_over_hf": 8.0}\n'
                            '{"compare": 16, "equal_prefix": 16, "graphs_equal_prefix": 15}')},
                        "moe_layer": {"rc": 0, "results": bench_gpu.json_lines(
                            '{"regime": "skewed", "experts": 64, "grouped_vs_dense": 1.1, '
                            '"medmoe_vs_dense": 1.5, "megatron_vs_dense": 1.9, '
                            '"reference_vs_dense": null}')},
                        "memory_full": {"rc": 0, "results": bench_gpu.json_lines(
                            '{"device": "cuda", "measured_peak_gib": 100.0, "plan_text_only_gib":'
                            ' {"total": 103.0}, "plan_over_measured": 1.03}')}}}
    table = bench_gpu.markdown(report)
    assert "| step_grouped | Med-MoE stage 3 (E=4) | 16384 | 400 | 0.404 | 61.2 |" in table
    assert "ratio 1.091" in table
    assert "| decode_profile | 1 | {'16': 10.0} | 100.0 | 0.5 | 900 |" in table
    assert "| decode_vs_hf_dense | 8 | 400.0 | 800.0 | 100.0 | 4.0 | 8.0 |" in table
    assert "greedy tokens equal to HF: 16 (graphed 15) of 16" in table
    assert "(full fine-tuning): measured 100.0 GiB, plan 103.0 GiB, plan / measured 1.03" in table
    assert "| 64 | skewed | 1.1 | 1.5 | 1.9 | None |" in table
    assert "Failed parts: decode_vs_hf_moe (rc timeout)" in table and "something not measured" in table


def test_the_suite_fits_its_time_budget():
    assert sum(limit for _, limit in bench_gpu.PARTS.values()) <= 8 * 60


@pytest.mark.parametrize("experts", [0, 4])
def test_decoding_against_transformers_gives_the_same_tokens(tmp_path, single_rank, capsys,
                                                             experts):
    from tools import bench_hf_decode

    assert bench_hf_decode.main(["--flavor", "tiny", "--num-experts", str(experts),
                                 "--moe-router-topk", "2", "--batch-sizes", "1", "2",
                                 "--new-tokens", "8", "--compare", "8",
                                 "--work-dir", str(tmp_path)]) == 0
    lines = bench_gpu.json_lines(capsys.readouterr().out)
    speed = [line for line in lines if "ours_tokens_per_s" in line]
    assert [line["batch"] for line in speed] == [1, 2]
    assert all(line["ours_tokens_per_s"] > 0 and line["hf_tokens_per_s"] > 0 for line in speed)
    (tokens,) = [line for line in lines if "equal_prefix" in line]
    assert tokens["equal_prefix"] == 8 and tokens["ours"] == tokens["hf"], tokens
    assert tokens["graphs_equal_prefix"] == 8 and tokens["ours_graphs"] == tokens["hf"], tokens
    assert not list(tmp_path.iterdir())  # the work folder is removed
