"""Packed rows against the same samples unpacked at TP2+SP (tests/integration/packing_step.py
under torchrun, 2 gloo ranks); TP1 is tests/unit/test_packing.py."""

from tests.conftest import run_tool


def test_packed_rows_equal_the_samples_unpacked_at_tp2_sp():
    r = run_tool("tests/integration/packing_step.py", nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("packed equals unpacked at TP2+SP") == 4


def test_bench_packing_reports_both_modes(tmp_path):
    """tools/bench_packing.py: a padded and a packed run of the real trainer, with their
    ratios; the packed rows hold more samples and less padding."""
    import json

    r = run_tool("tools/bench_packing.py", "--work-dir", str(tmp_path), "--iters", "3",
                 "--warmup", "1", "--num-workers", "0", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    padded, packed, ratios = (json.loads(line) for line in r.stdout.strip().splitlines()[-3:])
    assert (padded["mode"], packed["mode"]) == ("padded", "packed")
    assert packed["samples_per_step"] > padded["samples_per_step"] == 4
    assert packed["padding_share"] < padded["padding_share"]
    assert set(ratios["packed_over_padded"]) == {"samples_per_s", "real_tokens_per_s", "step_ms"}
