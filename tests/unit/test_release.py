"""The release format (conversion/release.py) and what the authors' code reads: an authors'
multimodal Med-MoE folder round trip, routing semantics, legacy config keys, refusals."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import MoEConfig
from medmoe_mcore.conversion.hf_config import language_config_from_hf
from medmoe_mcore.conversion.hf_files import read_hf_config
from medmoe_mcore.conversion.llava import import_multimodal
from medmoe_mcore.conversion.release import export_release
from medmoe_mcore.conversion.tables.vision import LAYOUTS, relayout
from medmoe_mcore.models.medmoe import MedMoEModel
from tests import tiny_hf
from tests.demo_setup import make_workspace

MOE_LAYERS = [0, 2]


def _authors_moe(tmp_path, topk: int):
    """A tiny Med-MoE folder as the authors' code writes it: their key names, their `moe`
    dict only, legacy top-level rotary keys, no LM-head bias, no remote code."""
    llava = tiny_hf.build_llava("phi", tmp_path / "llava")
    clip = tiny_hf.build_clip(tmp_path / "clip")
    out = tmp_path / "authors"
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, value in load_file(llava / "model.safetensors").items():
        key = relayout(key, LAYOUTS["llava"], LAYOUTS["authors"])
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if layer is not None and int(layer) in MOE_LAYERS and ".mlp." in key:
            for j in range(4):
                tensors[key.replace(".mlp.", f".mlp.deepspeed_moe.experts.deepspeed_experts."
                                    f"{j}.")] = value + 0.01 * torch.randn(value.shape, generator=g)
            tensors[key.replace(".mlp.", ".mlp.meta_moe.")] = value.clone()
        else:
            tensors[key] = value
    for layer in MOE_LAYERS:
        gate = f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg."
        tensors[gate + "weight"] = torch.randn(4, 60, generator=g)
        tensors[gate + "bias"] = torch.randn(4, generator=g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((llava / "config.json").read_text())["text_config"]
    rope = text.pop("rope_parameters")
    text.update(model_type="moe_llava_phi", architectures=["MoELLaVAPhiForCausalLM"],
                partial_rotary_factor=rope["partial_rotary_factor"],
                rope_theta=rope["rope_theta"], mm_vision_select_layer=-2,
                mm_projector_type="mlp2x_gelu", mm_hidden_size=32, image_aspect_ratio="pad",
                image_tower="openai/clip-vit-large-patch14-336", mm_use_im_start_end=False,
                moe=dict(moe_enable=True, moe_mode="sparse", moe_layers_idx=MOE_LAYERS,
                         ep_size=1, num_experts=[4, 4], top_k_experts=topk, capacity_factor=1.5,
                         eval_capacity_factor=2.0, min_capacity=0, use_residual=False,
                         router_aux_loss_coef=0.01, train_modules=["fc1", "fc2", "wg"]))
    (out / "config.json").write_text(json.dumps(text))
    return tiny_hf.add_tokenizer(out), clip


@pytest.mark.parametrize("topk", [1, 2])
def test_authors_moe_folder_round_trip_is_bit_exact(tmp_path, single_rank, topk):
    src, clip = _authors_moe(tmp_path, topk)
    import_multimodal(src, tmp_path / "ckpt", vision_hf_dir=clip, show_progress=False)
    cfg = store.read_config(tmp_path / "ckpt")
    # The authors' top-2 renormalises its two weights, their top-1 does not.
    assert cfg.moe.renormalize is (topk == 2) and cfg.moe.router_topk == topk
    assert cfg.language.output_layer_bias is False and cfg.moe.meta_expert
    export_release(tmp_path / "ckpt", tmp_path / "out", show_progress=False,
                   tokenizer_dir=_hf_tokenizer(tmp_path))
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    theirs = json.loads((src / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in theirs.items():
        if key == "moe":
            for k, v in value.items():
                assert ours["moe"][k] == v, (k, ours["moe"][k], v)
        # Ours names our class (auto_map); token ids follow the release's tokenizer.
        elif key not in ("architectures", "eos_token_id", "pad_token_id", "bos_token_id"):
            assert ours[key] == value, (key, ours[key], value)
    assert ours["moe"]["renormalize"] is (topk == 2)


def _hf_tokenizer(tmp_path):
    from medmoe_mcore.data.tokenizer import train_bpe

    train_bpe(["a chest x-ray", "an axial slice"] * 20, tmp_path / "tok", vocab_size=300)
    return tmp_path / "tok"


def test_renormalisation_is_computed_as_configured(tmp_path, single_rank):
    """HF (our remote class) and Megatron logits agree on an authors' top-2 folder; flipping
    the HF side's renormalisation changes them (so the check can fail)."""
    from medmoe_mcore.hf.modeling_medmoe import MedMoePhiForCausalLM

    src, clip = _authors_moe(tmp_path, 2)
    import_multimodal(src, tmp_path / "ckpt", vision_hf_dir=clip, show_progress=False)
    cfg = store.read_config(tmp_path / "ckpt")
    export_release(tmp_path / "ckpt", tmp_path / "out", show_progress=False,
                   tokenizer_dir=_hf_tokenizer(tmp_path))
    model = MedMoEModel(cfg, parallel_output=False)
    store.load_into(model, tmp_path / "ckpt")
    hf = MedMoePhiForCausalLM.from_pretrained(tmp_path / "out").eval()
    image_id = hf.config.image_token_index
    v = cfg.vision
    images = torch.randn(1, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1))
    text = [5, 9, 13]
    with torch.no_grad():
        ours = model.eval()(torch.tensor([[text[0], v.image_token_id, *text[1:]]]),
                            images)[0, :, :cfg.language.vocab_size]
        ids = torch.tensor([[text[0], *[image_id] * v.num_patches, *text[1:]]])
        ref = hf(input_ids=ids, pixel_values=images).logits[0]
        assert (ours - ref).abs().max() < 1e-4
        for layer in MOE_LAYERS:
            hf.model.layers[layer].mlp.renormalize = False
        flipped = hf(input_ids=ids, pixel_values=images).logits[0]
        assert (ours - flipped).abs().max() > 1e-3


def test_legacy_config_keys_read_and_written(tmp_path, single_rank):
    folder = tiny_hf.build("stablelm", tmp_path / "slm")
    raw = json.loads((folder / "config.json").read_text())
    for modern in ("rope_parameters", "layer_norm_eps"):
        raw.pop(modern, None)
    raw.update(rope_pct=0.5, norm_eps=1e-6, rope_theta=10000)  # the authors' stablelm_epoch
    (folder / "config.json").write_text(json.dumps(raw))
    lm = language_config_from_hf(read_hf_config(folder))
    assert lm.rotary_percent == 0.5 and lm.layernorm_epsilon == 1e-6
    raw["rope_parameters"] = {"rope_type": "default", "partial_rotary_factor": 0.25,
                              "rope_theta": 10000}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="rope_pct=0.5 disagrees"):
        read_hf_config(folder)


def test_release_config_carries_what_the_authors_code_reads(tmp_path, single_rank):
    ws = make_workspace(tmp_path / "ws")
    export_release(ws["init"], tmp_path / "out", show_progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    model = store.read_config(ws["init"])
    assert cfg["model_type"] == "llava_phi" and cfg["torch_dtype"] == "float32"
    assert cfg["partial_rotary_factor"] == model.language.rotary_percent
    assert cfg["rope_theta"] == model.language.rotary_base
    assert cfg["layer_norm_eps"] == model.language.layernorm_epsilon
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_medmoe.LlavaPhiForCausalLM"
    assert {"chat_template.jinja", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "configuration_medmoe.py",
            "modeling_medmoe.py", "README.md"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("change,field", [
    (dict(routing_granularity="sample"), "moe.routing_granularity"),
    (dict(meta_expert=False), "moe.meta_expert"),
    (dict(router_topk=2, renormalize=False), "moe.renormalize"),
    (dict(router_topk=1, renormalize=True), "moe.renormalize"),
    (dict(router_topk=3, renormalize=True), "moe.router_topk"),
    (None, "language.output_layer_bias"),
])
def test_exports_the_authors_code_would_compute_differently_are_refused(
        tmp_path, single_rank, change, field):
    ws = make_workspace(tmp_path / "ws")
    cfg = store.read_config(ws["init"])
    if change is None:
        cfg = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language,
                                                                    output_layer_bias=True))
    else:
        cfg = dataclasses.replace(cfg, moe=MoEConfig(**change))
    store.save(_with_head_bias(cfg, 0.1).sharded_state_dict(), tmp_path / "m", cfg,
               extra_dirs={store.TOKENIZER: ws["tokenizer"]})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        export_release(tmp_path / "m", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    export_release(tmp_path / "m", tmp_path / "out", accept_divergence=True,
                   show_progress=False)
    assert field in (tmp_path / "out" / "README.md").read_text()


def test_unknown_config_keys_are_refused(tmp_path, single_rank):
    folder = tiny_hf.build("phi", tmp_path / "phi")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "sliding_window_size": 64}))
    with pytest.raises(ConfigError, match="sliding_window_size"):
        read_hf_config(folder)
    src, _ = _authors_moe(tmp_path, 2)
    raw = json.loads((src / "config.json").read_text())
    raw["moe"]["expert_choice"] = True
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="expert_choice"):
        import_multimodal(src, tmp_path / "ckpt", vision_hf_dir=tmp_path / "clip",
                          show_progress=False)


def test_upcycling_top2_follows_the_authors():
    assert MoEConfig.from_choices({"router_topk": 2}).renormalize is True
    assert MoEConfig.from_choices({}).renormalize is False
    assert MoEConfig.from_choices({"router_topk": 2, "renormalize": False}).renormalize is False


def _with_head_bias(cfg, value: float):
    """The model of `cfg` with its LM-head bias (if any) filled with `value`."""
    model = MedMoEModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("output_layer.bias"):
                p.fill_(value)
    return model


def test_an_all_zero_lm_head_bias_is_left_out_of_every_export(tmp_path, single_rank):
    """Megatron initialises the bias to zero: left out, no flag needed, same logits."""
    from medmoe_mcore.conversion.llava import export_llava

    ws = make_workspace(tmp_path / "ws")
    cfg = store.read_config(ws["init"])
    biased = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language,
                                                                   output_layer_bias=True))
    store.save(_with_head_bias(biased, 0.0).sharded_state_dict(), tmp_path / "z", biased,
               extra_dirs={store.TOKENIZER: ws["tokenizer"]})
    for export, out in ((export_llava, "llava"), (export_release, "release")):
        export(tmp_path / "z", tmp_path / out, show_progress=False)
        names = [k for f in (tmp_path / out).glob("*.safetensors") for k in load_file(f)]
        assert names and not any(k.endswith("lm_head.bias") for k in names), out
    assert json.loads((tmp_path / "release" / "config.json").read_text())["lm_head_bias"] \
        is False


def test_llava_format_needs_an_explicit_lm_head_bias_choice(tmp_path, single_rank):
    from medmoe_mcore.conversion.llava import export_llava

    ws = make_workspace(tmp_path / "ws")
    cfg = store.read_config(ws["init"])
    biased = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language,
                                                                   output_layer_bias=True))
    store.save(_with_head_bias(biased, 0.1).sharded_state_dict(), tmp_path / "b", biased)
    with pytest.raises(ConfigError, match="--drop-lm-head-bias"):
        export_llava(tmp_path / "b", tmp_path / "out", show_progress=False)
    export_llava(tmp_path / "b", tmp_path / "out", show_progress=False, drop_lm_head_bias=True)
    keys = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.endswith("lm_head.bias") for k in keys)
    moe = dataclasses.replace(cfg, moe=MoEConfig())
    store.save(MedMoEModel(moe).sharded_state_dict(), tmp_path / "m", moe)
    with pytest.raises(ConfigError, match="--format medmoe"):
        export_llava(tmp_path / "m", tmp_path / "out2", show_progress=False)


def test_generate_tool_checks_its_inputs_before_any_model(tmp_path, capsys):
    from tools.generate import main

    assert main(["--load", str(tmp_path), "--question", "What is it?"]) == 2  # text-only
    assert "--question needs --image" not in capsys.readouterr().err  # (no checkpoint there)
    assert main(["--load", str(tmp_path), "--question", "q", "--image", "nope.png"]) == 2
    assert "--image nope.png: not found" in capsys.readouterr().err
    assert main(["--load", str(tmp_path), "--question", "q", "--image", "x",
                 "--temperature", "0", "--top-p", "0.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    for flags, named in ((["--dicom-frames", "all"], "--dicom-frames all: a question carries"),
                         (["--dicom-window", "lung"], "--dicom-window lung: give CENTER,WIDTH")):
        assert main(["--load", str(tmp_path), "--question", "q", "--image", "x", *flags]) == 2
        assert named in capsys.readouterr().err


def test_release_imports_back_and_answers_through_generate_tool(tmp_path, single_rank, capsys):
    from tests.release_setup import QUESTIONS, write_questions
    from tools.generate import main

    ws = make_workspace(tmp_path / "ws")
    export_release(ws["init"], tmp_path / "out", show_progress=False)
    import_multimodal(tmp_path / "out", tmp_path / "back", show_progress=False)
    export_release(tmp_path / "back", tmp_path / "again", show_progress=False)
    a = load_file(tmp_path / "out" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    questions = write_questions(tmp_path / "q")
    assert main(["--load", str(ws["init"]), "--questions", str(questions),
                 "--max-new-tokens", "4"]) == 0
    from_checkpoint = capsys.readouterr().out.strip().splitlines()[-len(QUESTIONS):]
    assert main(["--hf-dir", str(tmp_path / "out"), "--questions", str(questions),
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-len(QUESTIONS):] == from_checkpoint


def test_stablelm_release_answers_like_megatron(tmp_path, single_rank):
    """The StableLM family end to end: legacy keys of their `stablelm_epoch` config written,
    our classes answer as the Megatron engine does (Med-MoE, top-2)."""
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.model import ModelConfig, ParallelConfig
    from medmoe_mcore.data.tokenizer import Tokenizer
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import load_for_inference
    from medmoe_mcore.inference.questions import answer, read_questions
    from tests.release_setup import hf_answers, write_questions

    ws = make_workspace(tmp_path / "ws")
    tok = Tokenizer(ws["tokenizer"])
    cfg = ModelConfig(language=medmoe_language("tiny_stablelm"), moe=MoEConfig(router_topk=2),
                      vision=vision_flavor("tiny_stablelm", tok.image_token_id))
    torch.manual_seed(0)
    store.save(MedMoEModel(cfg).sharded_state_dict(), tmp_path / "m", cfg,
                       extra_dirs={store.TOKENIZER: ws["tokenizer"]})
    export_release(tmp_path / "m", tmp_path / "out", show_progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "moe_llava_stablelm" and written["moe"]["renormalize"]
    assert (written["rope_pct"], written["norm_eps"]) == (0.25, 1e-5)
    questions = write_questions(tmp_path / "q")
    model, _ = load_for_inference(tmp_path / "m", ParallelConfig())
    ours = answer(model, read_questions(questions), tok, GenerationConfig(max_new_tokens=8))
    assert [a["tokens"] for a in ours] == hf_answers(tmp_path / "out", questions, 8)
