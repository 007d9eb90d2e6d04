"""tools/bench_step.py at a tiny size on CPU (the GPU run of the scaling issue uses the same
tool with --bf16): one JSON line per step and per expert count, FLOPs counted right."""

import json

import pytest

from tests.conftest import run_tool

TINY = ("--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
        "--num-attention-heads", "4", "--vocab-size", "128", "--seq-length", "32",
        "--expert-model-parallel-size", "1", "--steps", "1")
# TINY's dense stage-2 step trains everything: 6 x matmul parameters x tokens, plus the
# attention core (QK^T, AV: 4 s^2 h forward, 3x with backward) in every layer
_H, _FFN, _LAYERS, _VOCAB, _SEQ = 64, 128, 2, 128, 32
TINY_DENSE_FLOPS = 6 * (_LAYERS * (4 * _H * _H + 2 * _H * _FFN) + _VOCAB * _H) * _SEQ \
    + 12 * _SEQ ** 2 * _H * _LAYERS


def test_bench_step_reports_every_expert_count_with_counted_flops():
    r = run_tool("tools/bench_step.py", *TINY, "--num-experts", "2,4", "--peak-tflops", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    steps = [line for line in lines if "step" in line]
    ratios = [line for line in lines if "time_ratio" in line]
    assert [s["num_experts"] for s in steps] == [0, 2, 4]
    assert [line["num_experts"] for line in ratios] == [2, 4]
    assert steps[0]["flops_all_ranks"] == TINY_DENSE_FLOPS
    for s in steps:
        assert s["core_attention"] == "SDPAttention" and s["dtype"] == "float32"
        assert s["mfu"] == pytest.approx(s["flops_all_ranks"] / s["step_s"] / 1e12, rel=0.02)
        assert s["tokens_per_s"] > 0 and s["forward_ms_this_rank"]["attention"] > 0
    assert "routed_experts_compute" in steps[1]["forward_ms_this_rank"]


def test_bench_step_refuses_bf16_on_cpu():
    r = run_tool("tools/bench_step.py", *TINY, "--bf16")
    assert r.returncode != 0 and "--bf16" in r.stderr and "CPU" in r.stderr
