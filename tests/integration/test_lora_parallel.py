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


def test_gated_lora_checkpoint_round_trip_over_layouts_is_bitwise(tmp_path):
    """TP1 -> TP2+SP -> EP2 -> TP1: every weight and adapter tensor unchanged (bytes; that
    each layout computes with the right rows is test_moe_parallel's LoRA variants)."""
    script = "tests/integration/lora_reshard.py"
    steps = [(("init", "1", "1", "-", tmp_path / "a"), 1),
             (("load", "2", "1", tmp_path / "a", tmp_path / "b"), 2),
             (("load", "1", "2", tmp_path / "b", tmp_path / "c"), 2),
             (("compare", "1", "1", tmp_path / "c", tmp_path / "a"), 1)]
    for args, nproc in steps:
        r = run_tool(script, *map(str, args), nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("IDENTICAL"), r.stdout[-500:]
