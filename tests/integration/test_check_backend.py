"""tools/check_backend.py at the tiny size, as a user runs it: one checkpoint into both backends
(local twice where Transformer Engine is absent), logits compared in float32 and bf16, a
stage-3 step timed in each, one JSON line with the verdict."""

import json

from tests.conftest import run_tool


def test_check_backend_tiny():
    r = run_tool("tools/check_backend.py", "--sizes", "tiny", "--steps", "1", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    tiny = report["sizes"]["tiny"]
    assert report["verdict"] == "same" and tiny["same"]
    assert set(tiny["tokens_per_s"]) == {"local", "other"}
    assert all(v > 0 for v in tiny["tokens_per_s"].values())
    if not report["transformer_engine_installed"]:
        assert report["compared"] == ["local", "local"]
        assert "Transformer Engine is not installed here" in r.stdout
        assert tiny["max_abs_logit_diff_float32"] == 0.0  # the same model loaded twice
