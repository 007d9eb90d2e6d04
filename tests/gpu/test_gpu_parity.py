"""HF parity on a GPU (float32 and bf16). Skipped without CUDA."""

import json

import pytest
import torch

from tests import tiny_hf
from tests.conftest import run_tool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("family", ["phi", "stablelm"])
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-4), ("bfloat16", None)])
def test_gpu_parity(tmp_path, family, dtype, bound):
    hf = tiny_hf.build(family, tmp_path / "hf")
    conv = run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                    str(tmp_path / "ckpt"), "--no-progress")
    assert conv.returncode == 0, conv.stderr[-3000:]
    nproc = min(2, torch.cuda.device_count())
    proc = run_tool("tools/verify_conversion.py", "--hf-dir", str(hf), "--load",
                    str(tmp_path / "ckpt"), "--tensor-model-parallel-size", str(nproc),
                    "--dtype", dtype, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cuda" and result["passed"], result
    print(json.dumps(result))
