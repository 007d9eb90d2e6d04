"""tools/bench_step.py in bf16 on a GPU at a tiny size: the run the scaling issue's GPU figures
come from (tokens/s, MFU, peak memory), its FLOPs with CUDA's SDPA counted by torch. Skipped
without CUDA."""

import json

import pytest
import torch

from tests.conftest import run_tool
from tests.integration.test_bench_step import TINY, TINY_DENSE_FLOPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_gpu_bench_step_bf16():
    r = run_tool("tools/bench_step.py", *TINY, "--num-experts", "4,8", "--bf16",
                 "--peak-tflops", "989")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    steps = [json.loads(line) for line in r.stdout.splitlines()
             if line.startswith("{") and '"step"' in line]
    assert [s["num_experts"] for s in steps] == [0, 4, 8]
    assert steps[0]["flops_all_ranks"] == pytest.approx(TINY_DENSE_FLOPS, rel=1e-6)
    for s in steps:
        assert s["device"] != "cpu" and s["dtype"] == "bfloat16"
        assert s["core_attention"] == "SDPAttention"
        assert s["mfu"] > 0 and s["peak_memory_gib_max_rank"] > 0
    print(json.dumps(steps))
