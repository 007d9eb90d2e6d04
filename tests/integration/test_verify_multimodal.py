"""tools/verify_conversion.py on a multimodal checkpoint at TP1 and TP2+SP (real images)."""

import json

import pytest

from medmoe_mcore.conversion.llava import import_multimodal
from tests import tiny_hf
from tests.conftest import run_tool


@pytest.mark.parametrize("tp", [1, 2])
def test_verify_tool_multimodal(tmp_path, single_rank, tp):
    hf_dir = tiny_hf.build_llava("stablelm" if tp == 1 else "phi", tmp_path / "hf")
    import_multimodal(hf_dir, tmp_path / "ckpt", show_progress=False)
    r = run_tool("tools/verify_conversion.py", "--hf-dir", str(hf_dir), "--load",
                 str(tmp_path / "ckpt"), "--tensor-model-parallel-size", str(tp), nproc=tp)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["multimodal"] and result["tp"] == tp and result["max_abs_logit_diff"] < 1e-4
