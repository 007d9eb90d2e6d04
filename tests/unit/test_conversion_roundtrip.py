"""HF -> Megatron -> HF on tiny random models: bit-exact, loadable, refusing bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.language import export_hf, import_hf
from tests import tiny_hf


@pytest.mark.parametrize("family,overrides", [("phi", {}), ("stablelm", {}),
                                               ("phi", tiny_hf.PHI_ODD_HEADS),
                                               ("stablelm", {"use_qkv_bias": False})])
def test_round_trip_bit_exact(tmp_path, single_rank, family, overrides):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf.build(family, tmp_path / "hf", **overrides)
    (hf / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    import_hf(hf, tmp_path / "ckpt", show_progress=False)
    export_hf(tmp_path / "ckpt", tmp_path / "out", show_progress=False)
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(hf)
    ids = torch.randint(0, 900, (1, 9))
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_bf16_round_trip_keeps_dtype(tmp_path, single_rank):
    hf = tiny_hf.build("phi", tmp_path / "hf")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(hf / "model.safetensors").items()}
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    import_hf(hf, tmp_path / "ckpt", show_progress=False)
    export_hf(tmp_path / "ckpt", tmp_path / "out", show_progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], tensors[k]) for k in tensors)


def _edit(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_extra_tensor_is_refused_with_its_key(tmp_path, single_rank):
    hf = tiny_hf.build("phi", tmp_path / "hf")
    _edit(hf, lambda t: t.__setitem__("model.layers.1.mlp.fc3.weight", torch.zeros(2)))
    with pytest.raises(ConversionError, match=r"no table entry \(1\): model.layers.1.mlp.fc3.weight"):
        import_hf(hf, tmp_path / "ckpt", show_progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_missing_tensor_is_refused_with_its_key(tmp_path, single_rank):
    hf = tiny_hf.build("stablelm", tmp_path / "hf")
    _edit(hf, lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(ConversionError,
                       match=r"no source tensor provides \(1\): decoder.layers.2.mlp.linear_fc2"):
        import_hf(hf, tmp_path / "ckpt", show_progress=False)


def test_missing_half_of_fused_tensor_is_refused(tmp_path, single_rank):
    hf = tiny_hf.build("stablelm", tmp_path / "hf")
    _edit(hf, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.k_proj.bias"):
        import_hf(hf, tmp_path / "ckpt", show_progress=False)
