"""Med-MoE checkpoints -> HF (authors' layout + remote code) and back.

- The export loads with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
  from the folder alone and matches Megatron's logits at EP=2 and TP2+SP x EP2 (experts are
  all different, so an expert mix-up would show).
- The authors' layout (no LM-head bias, their `moe` dict only) imports, and exports back
  bit-exact; a checkpoint missing an expert is refused with the expert's keys named.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.language import export_hf, import_hf
from tests import tiny_hf
from tests.conftest import run_tool

AUTHORS_MOE_KEYS = ("moe_enable", "moe_mode", "moe_layers_idx", "ep_size", "top_k_experts",
                    "capacity_factor", "eval_capacity_factor", "min_capacity", "use_residual",
                    "router_aux_loss_coef", "train_modules", "num_experts")


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_export")
    _ok(run_tool("tests/integration/moe_step.py", "--init", str(root / "ckpt"), "--out",
                 str(root / "ref"), "--variants", "phi_e6_top2_sample,stablelm_e4_top1_sample",
                 timeout=600))
    return root


@pytest.mark.parametrize("variant,tp,ep", [("phi_e6_top2_sample", 1, 2),
                                           ("stablelm_e4_top1_sample", 2, 2)])
def test_moe_export_loads_with_remote_code_and_matches(moe_checkpoints, variant, tp, ep):
    ckpt, hf = moe_checkpoints / "ckpt" / variant, moe_checkpoints / f"{variant}_hf"
    _ok(run_tool("tools/convert_mcore_to_hf.py", "--load", str(ckpt), "--hf-dir", str(hf),
                 "--no-progress"))
    config = json.loads((hf / "config.json").read_text())
    assert set(AUTHORS_MOE_KEYS) <= set(config["moe"]) and "auto_map" in config
    assert (hf / "modeling_medmoe.py").exists() and (hf / "configuration_medmoe.py").exists()
    # verify_conversion runs no code from the folder it checks (the installed classes)
    with open(hf / "modeling_medmoe.py", "a") as f:
        f.write("\nraise RuntimeError('code from the checked folder ran')\n")
    proc = _ok(run_tool("tools/verify_conversion.py", "--hf-dir", str(hf), "--load", str(ckpt),
                        "--tensor-model-parallel-size", str(tp),
                        "--expert-model-parallel-size", str(ep), nproc=tp * ep, timeout=600))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["moe"] and result["ep"] == ep and result["max_abs_logit_diff"] < 1e-4, result


def _authors_folder(ours, folder):
    """Our export rewritten as the authors would ship it: their `moe` keys only, no LM-head
    bias, no remote code."""
    folder.mkdir()
    config = json.loads((ours / "config.json").read_text())
    config["moe"] = {k: config["moe"][k] for k in AUTHORS_MOE_KEYS}
    config["moe"]["router_aux_loss_coef"] = 0.01
    for key in ("auto_map", "lm_head_bias"):
        config.pop(key, None)
    config["architectures"] = ["MoELLaVAPhiForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(ours / "model.safetensors").items()
               if k != "lm_head.bias"}
    save_file(tensors, folder / "model.safetensors")
    tiny_hf.add_tokenizer(folder)
    return tensors


def test_authors_layout_round_trip_is_bit_exact(moe_checkpoints, tmp_path, single_rank):
    ours = moe_checkpoints / "phi_e6_top2_sample_hf"
    if not ours.exists():
        export_hf(moe_checkpoints / "ckpt" / "phi_e6_top2_sample", ours, show_progress=False)
    tensors = _authors_folder(ours, tmp_path / "authors")
    assert any(".deepspeed_moe.experts.deepspeed_experts.5." in k for k in tensors)
    import_hf(tmp_path / "authors", tmp_path / "ckpt", show_progress=False)
    export_hf(tmp_path / "ckpt", tmp_path / "back", show_progress=False)
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(back[key], tensor), key
    moe = json.loads((tmp_path / "back" / "config.json").read_text())["moe"]
    assert moe["router_aux_loss_coef"] == 0.01  # their inert value, kept as written
    imported = store.read_config(tmp_path / "ckpt").moe
    assert imported.aux_loss_coeff == 0.0  # the fixed router has no aux loss
    assert imported.renormalize and moe["renormalize"]  # the authors' top-2 renormalises


def test_missing_expert_is_named(moe_checkpoints, tmp_path, single_rank):
    ours = moe_checkpoints / "phi_e6_top2_sample_hf"
    if not ours.exists():
        export_hf(moe_checkpoints / "ckpt" / "phi_e6_top2_sample", ours, show_progress=False)
    tensors = _authors_folder(ours, tmp_path / "authors")
    gone = "model.layers.3.mlp.deepspeed_moe.experts.deepspeed_experts.4."
    save_file({k: v for k, v in tensors.items() if not k.startswith(gone)},
              tmp_path / "authors" / "model.safetensors")
    with pytest.raises(ConversionError, match=r"decoder\.layers\.3\.mlp\.experts\."
                                              r"local_experts\.4\.linear_fc1\.weight"):
        import_hf(tmp_path / "authors", tmp_path / "ckpt", show_progress=False)
    assert not (tmp_path / "ckpt").exists()
