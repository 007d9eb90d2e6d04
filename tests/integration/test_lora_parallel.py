"""LoRA adapters at TP = 2, with and without sequence parallelism, equal the single-device
computation (output, input gradient, A and B gradients) within 1e-5 (float32)."""

import json

import pytest

from tests.conftest import run_tool


@pytest.mark.parametrize("sp", [False, True])
def test_lora_adapters_at_tp2_equal_one_device(sp):
    r = run_tool("tests/integration/lora_parity.py", *(["--sequence-parallel"] if sp else []),
                 nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(diffs) == 8 and max(diffs.values()) < 1e-5, diffs
