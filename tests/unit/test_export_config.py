"""Every export writes its config.json the same way (conversion/hf_files.write_config): the
text-only Med-MoE export and the release carry the top-level keys the authors' MoE-LLaVA Phi
classes read (their names written out here), with the model's values; a transformers config
class re-serialising the dict dropped them (the authors' class then read its default rotary
fraction 0.5 instead of Phi-2's 0.4); an LM-head bias still at its initial zeros is left
out (their classes have none)."""

import dataclasses
import json

import torch
from safetensors.torch import load_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig

# what the authors' LlavaPhiConfig / MoELLaVAPhiConfig read at the top level, and in `moe`
AUTHORS_TOP = {"hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size",
               "num_hidden_layers": "num_layers", "num_attention_heads": "num_attention_heads",
               "layer_norm_eps": "layernorm_epsilon", "rope_theta": "rotary_base",
               "partial_rotary_factor": "rotary_percent",
               "max_position_embeddings": "max_position_embeddings", "vocab_size": "vocab_size"}
AUTHORS_MOE = ("moe_enable", "moe_mode", "moe_layers_idx", "ep_size", "num_experts",
               "top_k_experts", "capacity_factor", "eval_capacity_factor", "min_capacity",
               "use_residual")


def _check(config: dict, cfg: ModelConfig) -> None:
    for key, field in AUTHORS_TOP.items():
        assert config[key] == getattr(cfg.language, field), key
    assert all(key in config["moe"] for key in AUTHORS_MOE)
    assert config["moe"]["top_k_experts"] == cfg.moe.router_topk
    assert config["moe"]["num_experts"] == [cfg.moe.num_experts] * 2


def test_text_only_and_release_exports_carry_the_authors_keys(tmp_path, single_rank):
    from medmoe_mcore.conversion.language import export_hf
    from medmoe_mcore.conversion.release import export_release
    from medmoe_mcore.data.tokenizer import train_bpe
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.models.medmoe import MedMoEModel

    # not the authors' class default (0.5), which would hide a dropped key
    lm = dataclasses.replace(medmoe_language("tiny"), rotary_percent=0.25)
    moe = MoEConfig(num_experts=2, router_topk=1)
    # Phi's LM-head bias, at Megatron's initial zeros: left out (the authors' class has none)
    text = ModelConfig(language=dataclasses.replace(lm, output_layer_bias=True),
                       moe=moe).validate()
    torch.manual_seed(0)
    store.save(LanguageModel(text).sharded_state_dict(), tmp_path / "text", text)
    export_hf(tmp_path / "text", tmp_path / "text_hf", show_progress=False)
    config = json.loads((tmp_path / "text_hf" / "config.json").read_text())
    _check(config, text)
    assert config["lm_head_bias"] is False
    assert "lm_head.bias" not in load_file(tmp_path / "text_hf" / "model.safetensors")

    tok = train_bpe(["a chest x-ray", "an axial ct slice"], tmp_path / "tok", vocab_size=300)
    multi = ModelConfig(language=lm, moe=moe,
                        vision=vision_flavor("tiny", tok.image_token_id)).validate()
    store.save(MedMoEModel(multi).sharded_state_dict(), tmp_path / "multi", multi,
               extra_dirs={store.TOKENIZER: tmp_path / "tok"})
    export_release(tmp_path / "multi", tmp_path / "release", show_progress=False)
    _check(json.loads((tmp_path / "release" / "config.json").read_text()), multi)
