"""HF parity of the Megatron language models at TP=1 and TP=2 (+SP) on 2 gloo processes,
driven through the real command-line tools."""

import json

import pytest
import torch

from tests import tiny_hf
from tests.conftest import run_tool


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _verify(hf, ckpt, tp):
    proc = run_tool("tools/verify_conversion.py", "--hf-dir", str(hf), "--load", str(ckpt),
                    "--tensor-model-parallel-size", str(tp), nproc=tp)
    result = json.loads(_ok(proc).stdout.strip().splitlines()[-1])
    assert result["tp"] == tp and result["ep"] == 1 and result["sp"] == (tp > 1)
    assert result["max_abs_logit_diff"] < 1e-4, result
    return result


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_hf_parity_tp1_and_tp2_sp(tmp_path, family):
    hf = tiny_hf.build(family, tmp_path / "hf")
    _ok(run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                 str(tmp_path / "ckpt"), "--no-progress"))
    _verify(hf, tmp_path / "ckpt", tp=1)
    _verify(hf, tmp_path / "ckpt", tp=2)


def test_verify_fails_on_a_wrong_checkpoint(tmp_path):
    """The check can fail: a checkpoint of other weights gives a large difference, exit 1."""
    hf = tiny_hf.build("phi", tmp_path / "hf", seed=0)
    other = tiny_hf.build("phi", tmp_path / "other", seed=1)
    _ok(run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(other), "--save",
                 str(tmp_path / "ckpt"), "--no-progress"))
    proc = run_tool("tools/verify_conversion.py", "--hf-dir", str(hf), "--load",
                    str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2", nproc=2)
    assert proc.returncode != 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_logit_diff"] > 1e-2


def test_cli_round_trip_and_refusal(tmp_path):
    hf = tiny_hf.build("stablelm", tmp_path / "hf")
    _ok(run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                 str(tmp_path / "ckpt"), "--no-progress"))
    _ok(run_tool("tools/convert_mcore_to_hf.py", "--load", str(tmp_path / "ckpt"), "--hf-dir",
                 str(tmp_path / "out"), "--no-progress"))
    proc = run_tool("tools/convert_mcore_to_hf.py", "--load", str(tmp_path / "ckpt"),
                    "--hf-dir", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr


def _train_step(ckpt, out, tp, *extra):
    _ok(run_tool("tests/integration/train_step.py", "--load", str(ckpt), "--out", str(out),
                 "--tp", str(tp), *extra, nproc=tp))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_tp2_sp_training_step_equals_tp1(tmp_path, family):
    """Loss and every gradient (Megatron DDP + finalize_model_grads) at TP2+SP == TP1."""
    hf = tiny_hf.build(family, tmp_path / "hf")
    _ok(run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                 str(tmp_path / "ckpt"), "--no-progress"))
    ref = _train_step(tmp_path / "ckpt", tmp_path / "tp1.pt", 1)
    got = _train_step(tmp_path / "ckpt", tmp_path / "tp2.pt", 2)
    assert torch.allclose(ref["loss"], got["loss"], atol=1e-6)
    for name, grad in ref["grads"].items():
        assert torch.allclose(grad, got["grads"][name], atol=1e-5, rtol=0), name
    if family == "phi":  # negative control: without the SP tag the norm grads drift
        bad = _train_step(tmp_path / "ckpt", tmp_path / "bad.pt", 2, "--drop-sp-tag")
        name = "decoder.final_layernorm.weight"
        assert not torch.allclose(ref["grads"][name], bad["grads"][name], atol=1e-5)


def test_cpu_runtime_runs_megatron_moe_alltoall_tp2_sp_ep2(tmp_path):
    """Megatron-Core's MoE (alltoall dispatcher, shared expert), DDP and optimizer with grad
    clipping on 4 gloo processes at TP2+SP x EP2: losses before and after one step == TP1/EP1."""
    ref, got = tmp_path / "ref.pt", tmp_path / "got.pt"
    _ok(run_tool("tests/integration/moe_runtime_step.py", "--save", str(tmp_path / "init"),
                 "--out", str(ref), nproc=1, timeout=600))
    _ok(run_tool("tests/integration/moe_runtime_step.py", "--tp", "2", "--ep", "2", "--load",
                 str(tmp_path / "init"), "--out", str(got), nproc=4, timeout=600))
    a, b = torch.load(ref, weights_only=True), torch.load(got, weights_only=True)
    assert torch.allclose(a["losses"], b["losses"], atol=1e-5), (a, b)
    assert a["losses"][1] < a["losses"][0]  # the step did something


def test_recompute_with_dropout_reproduces_gradients_tp2(tmp_path):
    """Full activation recompute with dropout at TP2+SP: the CPU RNG tracker and the autograd
    hook of the CPU runtime make the recomputed forward draw the same masks (bitwise grads)."""
    hf = tiny_hf.build("phi", tmp_path / "hf")
    _ok(run_tool("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                 str(tmp_path / "ckpt"), "--no-progress"))
    plain = _train_step(tmp_path / "ckpt", tmp_path / "a.pt", 2, "--dropout", "0.2")
    recomputed = _train_step(tmp_path / "ckpt", tmp_path / "b.pt", 2, "--dropout", "0.2",
                             "--recompute")
    nodrop = _train_step(tmp_path / "ckpt", tmp_path / "c.pt", 2)
    assert not torch.equal(plain["loss"], nodrop["loss"])  # dropout is really on
    assert torch.equal(plain["loss"], recomputed["loss"])
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, recomputed["grads"][name]), name
