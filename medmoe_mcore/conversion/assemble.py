"""Stage 1's starting point from public parts: a CLIP folder + a Phi-2/StableLM folder (+ a
projector file, else a fresh projector), into one Megatron multimodal checkpoint."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conventions import DEFAULT_SEED, IMAGE_SENTINEL_ID
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.hf_config import language_config_from_hf, moe_config_from_hf
from medmoe_mcore.conversion.hf_files import check_tokenizer, read_hf_config
from medmoe_mcore.conversion.llava import (clip_config, fill, multimodal_table, save_multimodal,
                                           split_clip)
from medmoe_mcore.conversion.preflight import checked_plan
from medmoe_mcore.conversion import hf_folder
from medmoe_mcore.conversion.hf_folder import open_weights
from medmoe_mcore.conversion.safetensors_io import read_file
from medmoe_mcore.conversion.tables.vision import Layout, detect_clip_root, vision_config_from_hf
from medmoe_mcore.conversion.target_model import conversion_model, storage_dtype
from medmoe_mcore.models.transformer_config import DTYPES


def _projector_tensors(path) -> dict[str, torch.Tensor]:
    """A projector file (safetensors): HF LLaVA or the authors' names, any prefix."""
    names = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}
    pattern = re.compile(r"(?:.*?(?:mm_projector|multi_modal_projector)\.)?"
                         r"(0|2|linear_1|linear_2)\.(weight|bias)\Z")
    out, unknown = {}, []
    for key, tensor in read_file(path).items():
        m = pattern.match(key)
        if m:
            out[f"{names[m.group(1)]}.{m.group(2)}"] = tensor
        else:
            unknown.append(key)
    if unknown or len(out) != 4:
        raise ConversionError(f"{path}: a projector file needs exactly linear_1/linear_2 (or "
                              f"mm_projector.0/2) weight and bias; unknown keys {unknown}, "
                              f"found {sorted(out)}")
    return out


def assemble(vision_hf_dir, language_hf_dir, save_root, projector_path=None,
             image_token_id: int = IMAGE_SENTINEL_ID, vision_feature_layer: int = -2,
             params_dtype: str | None = None, lm_head_bias: bool = True, seed: int = DEFAULT_SEED,
             show_progress=True, report: list[str] | None = None,
             overwrite: bool = False, tokenizer: bool = True) -> Path:
    """Stage-1 starting point from public parts: CLIP + Phi-2/StableLM (+ projector file, else
    freshly initialised like Megatron: normal(0, 0.02) weights, zero biases)."""
    store.check_can_release(save_root, overwrite)
    report = [] if report is None else report
    vision_hf_dir, language_hf_dir = map(hf_folder.resolve, (vision_hf_dir, language_hf_dir))
    clip_src, lm_src = open_weights(vision_hf_dir), open_weights(language_hf_dir)
    text = read_hf_config(language_hf_dir)
    lm = language_config_from_hf(text)
    if lm.output_layer_bias and not lm_head_bias:
        lm = dataclasses.replace(lm, output_layer_bias=False)
        report.append("dropped lm_head.bias (as the authors' LlavaPhi; HF LLaVA has none)")
    if tokenizer:
        check_tokenizer(language_hf_dir, lm.vocab_size)
    vision = vision_config_from_hf(clip_config(vision_hf_dir), vision_feature_layer,
                                   image_token_id)
    dtype = params_dtype or storage_dtype(lm_src)
    cfg = ModelConfig(language=lm, moe=moe_config_from_hf(text), vision=vision,
                      params_dtype=dtype).validate()
    root = detect_clip_root(clip_src.keys())
    # One key space for both folders: "clip/..." and "lm/...".
    layout = Layout("parts", "clip/" + root, (("linear_1.", "proj/linear_1."),
                                              ("linear_2.", "proj/linear_2.")),
                    "lm/model.", "lm/lm_head.")
    clip_keys, aside_keys, _ = split_clip(clip_src.keys(), root, vision, report)
    # key -> (read, shape on the meta device, name in its file)
    sources = {"clip/" + k: (clip_src.get, clip_src.meta, k) for k in clip_keys}
    sources.update({"lm/" + k: (lm_src.get, lm_src.meta, k) for k in lm_src.keys()
                    if lm_head_bias or k != "lm_head.bias"})
    projector = _projector_tensors(projector_path) if projector_path else None
    if projector is not None:
        sources.update({"proj/" + k: (projector.__getitem__,
                                      lambda k: projector[k].to("meta"), k) for k in projector})
    groups = checked_plan(
        cfg, multimodal_table(cfg, layout), sources,
        lambda k: sources[k][1](sources[k][2]),
        f"{vision_hf_dir} + {language_hf_dir}",
        keep=lambda k: projector is not None or not k.startswith("projector."))
    model = conversion_model(cfg)
    fill(model, groups, lambda k: sources[k][0](sources[k][2]), DTYPES[params_dtype]
          if params_dtype else None, show_progress, "parts -> Megatron")
    if projector is None:
        gen = torch.Generator().manual_seed(seed)
        std = model.projector.config.init_method_std
        for name, param in model.projector.named_parameters():
            fresh = torch.randn(param.shape, generator=gen) * std if name.endswith("weight") \
                else torch.zeros(param.shape)
            param.data = fresh.to(DTYPES[dtype])
        report.append(f"projector freshly initialised (normal(0, {std}) weights, zero biases, "
                      f"seed {seed})")
    else:
        report.append(f"projector from {projector_path}")
    hf_cfg = {"text_config": text, "vision_config": clip_config(vision_hf_dir)}
    return save_multimodal(model, cfg, save_root, hf_cfg,
                 {k: clip_src.get(v) for k, v in aside_keys.items()},
                 tokenizer_dir=language_hf_dir if tokenizer else None, overwrite=overwrite)


