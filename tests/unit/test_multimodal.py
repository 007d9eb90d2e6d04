"""The multimodal model and its conversion: HF LLaVA parity on real images, bit-exact round
trips, the authors' layout, CLIP-only features, and refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.conversion.assemble import assemble
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.llava import export_llava, import_multimodal
from medmoe_mcore.conversion.tables.vision import LAYOUTS, relayout
from medmoe_mcore.data.images import ImageDecodeError, load_image, preprocess
from medmoe_mcore.demo.medical_images import BY_NAME
from medmoe_mcore.models.medmoe import MedMoEModel, MultimodalInputError
from tests import tiny_hf

IMAGES = ("RG1_UNCI", "immunohistochemistry")  # chest X-ray, IHC pathology


def _real_images(vision):
    return torch.stack([preprocess(BY_NAME[n].load(), vision, train=False) for n in IMAGES])


def _megatron(ckpt):
    cfg = store.read_config(ckpt)
    model = MedMoEModel(cfg, parallel_output=False)
    store.load_into(model, ckpt)
    return model.eval(), cfg


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_llava_round_trip_bit_exact_and_generates(tmp_path, single_rank, family):
    from transformers import LlavaForConditionalGeneration

    hf = tiny_hf.build_llava(family, tmp_path / "hf")
    report = []
    import_multimodal(hf, tmp_path / "ckpt", show_progress=False, report=report)
    assert any("kept aside" in line for line in report)  # CLIP layer 3 + post_layernorm
    cfg = store.read_config(tmp_path / "ckpt")
    assert cfg.vision.num_layers == 2 and cfg.vision.source_num_layers == 3
    export_llava(tmp_path / "ckpt", tmp_path / "out", show_progress=False)
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    image_id = cfg.vision.image_token_id
    ids = torch.tensor([[5, *[image_id] * cfg.vision.num_patches, 7, 9]])
    out = model.generate(input_ids=ids, pixel_values=_real_images(cfg.vision)[:1],
                         max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_llava_logits_match_hf_on_real_images(tmp_path, single_rank):
    """Megatron (one placeholder per image) vs HF (placeholder expanded), float32."""
    from transformers import LlavaForConditionalGeneration

    hf_dir = tiny_hf.build_llava("phi", tmp_path / "hf")
    import_multimodal(hf_dir, tmp_path / "ckpt", show_progress=False)
    model, cfg = _megatron(tmp_path / "ckpt")
    v = cfg.vision
    images = _real_images(v)
    ids = torch.randint(0, 999, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3], ids[1, 0] = v.image_token_id, v.image_token_id
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(ids, images)[..., : cfg.language.vocab_size]
        for b in range(2):
            row = []
            for t in ids[b].tolist():
                row += [t] * v.num_patches if t == v.image_token_id else [t]
            ref = hf(input_ids=torch.tensor([row]), pixel_values=images[b:b + 1]).logits[0]
            assert (logits[b, : len(row)] - ref).abs().max() < 1e-4


def _as_authors_layout(llava_dir, out, clip_dir):
    """The tiny LLaVA rewritten as the authors' LlavaPhi checkpoint (their key names and
    config: mm_* keys, model_type llava_phi, no LM-head bias)."""
    out.mkdir()
    tensors = load_file(llava_dir / "model.safetensors")
    save_file({relayout(k, LAYOUTS["llava"], LAYOUTS["authors"]): v for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((llava_dir / "config.json").read_text())["text_config"]
    text.update(model_type="llava_phi", mm_vision_select_layer=-2,
                mm_projector_type="mlp2x_gelu", image_tower=str(clip_dir))
    (out / "config.json").write_text(json.dumps(text))
    return tiny_hf.add_tokenizer(out)


def test_authors_layout_imports_to_the_same_model(tmp_path, single_rank):
    hf_dir = tiny_hf.build_llava("phi", tmp_path / "hf")
    clip_dir = tiny_hf.build_clip(tmp_path / "clip")
    authors = _as_authors_layout(hf_dir, tmp_path / "authors", clip_dir)
    import_multimodal(hf_dir, tmp_path / "a", show_progress=False)
    import_multimodal(authors, tmp_path / "b", vision_hf_dir=clip_dir, show_progress=False)
    a, _ = _megatron(tmp_path / "a")
    b, cfg = _megatron(tmp_path / "b")
    assert cfg.vision.image_token_id == -200  # the authors' IMAGE_TOKEN_INDEX sentinel
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(value, sb[key]), key


def test_clip_only_features_match_hf_layer_minus_2(tmp_path, single_rank):
    from transformers import CLIPVisionModel

    clip_dir = tiny_hf.build_clip(tmp_path / "clip", seed=3)
    lm_dir = tiny_hf.build("phi", tmp_path / "phi")
    report = []
    assemble(clip_dir, lm_dir, tmp_path / "ckpt", show_progress=False, report=report)
    assert any("projector freshly initialised" in line for line in report)
    model, cfg = _megatron(tmp_path / "ckpt")
    images = _real_images(cfg.vision)
    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expected = ref(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = model.vision(images)[:, 1:]
    assert (ours - expected).abs().max() < 1e-5


def test_refusals(tmp_path, single_rank):
    hf_dir = tiny_hf.build_llava("phi", tmp_path / "hf")
    import_multimodal(hf_dir, tmp_path / "ckpt", show_progress=False)
    model, cfg = _megatron(tmp_path / "ckpt")
    image_id = cfg.vision.image_token_id
    images = _real_images(cfg.vision)
    ids = torch.tensor([[1, image_id, 2, image_id, 3]])
    with pytest.raises(MultimodalInputError, match="2 <image> placeholders .* but 1 images"):
        model(ids, images[:1])
    with pytest.raises(MultimodalInputError, match="1 <image> placeholders .* but 2 images"):
        model(ids[:, :3], images)
    with pytest.raises(MultimodalInputError, match="images: shape"):
        model(ids[:, :3], images[:1, :, :20])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        load_image(bad)
    # An unknown tensor in the HF folder is listed, never dropped.
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["multi_modal_projector.linear_3.weight"] = torch.zeros(2)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="multi_modal_projector.linear_3.weight"):
        import_multimodal(hf_dir, tmp_path / "ckpt2", show_progress=False)


def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    from medmoe_mcore.config.model import VisionConfig
    from medmoe_mcore.data.images import expand2square

    v = VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                     image_size=56, patch_size=14)
    processor = CLIPImageProcessor(size={"shortest_edge": 56},
                                   crop_size={"height": 56, "width": 56})
    image = BY_NAME["US1_UNCI"].load()  # 640 x 480: not square
    ref = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert (preprocess(image, v, train=False) - ref).abs().max() < 1e-5
    padded = expand2square(image, tuple(int(x * 255) for x in v.image_mean))
    ref = processor(images=padded, return_tensors="pt")["pixel_values"][0]
    assert (preprocess(image, v, train=True) - ref).abs().max() < 1e-5


def test_stage_freezing_on_the_multimodal_model(single_rank):
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ModelConfig, VisionConfig
    from medmoe_mcore.training.freezing import apply_stage

    v = VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                     image_size=56, patch_size=14)
    model = MedMoEModel(ModelConfig(language=language_flavor("tiny"), vision=v))
    stage1 = apply_stage(model, 1)
    assert stage1 and all(n.startswith("projector.") for n in stage1)
    stage2 = apply_stage(model, 2)
    assert {n.split(".")[0] for n in stage2} == {"projector", "language_model"}
    assert not any(p.requires_grad for p in model.vision.parameters())
