"""HF <-> Megatron conversion of the multimodal model (CLIP tower + projector + Phi/StableLM).

Sources: an HF `LlavaForConditionalGeneration` folder (any of the LLaVA layouts), the authors'
MoE-LLaVA layout, or separate public parts (a CLIP folder + a Phi-2/StableLM folder, projector
fresh or from a file), which is how stage 1 starts. Target: `LlavaForConditionalGeneration`.

CLIP tensors that never run (post_layernorm, layers past the feature layer) are kept aside in
the checkpoint (`hf_passthrough/`) and written back on export, so HF -> Megatron -> HF is
bit-exact; the import report names them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medmoe_mcore import checkpointing
from medmoe_mcore.runtime import parallel
from medmoe_mcore.checkpointing import PASSTHROUGH
from medmoe_mcore.config import ConfigError, ModelConfig, ParallelConfig, VisionConfig
from medmoe_mcore.conversion.engine import ConversionError, convert, plan
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.conversion.hf_config import (
    hf_config_from_language,
    language_config_from_hf,
    moe_config_from_hf,
)
from medmoe_mcore.conversion.language import (
    TOKENIZER_FILES,
    _progress,
    _storage_dtype,
    _weights,
    fill_parameters,
    hf_config_object,
    read_hf_config,
    weight_table,
)
from medmoe_mcore.conversion.mappings import Scoped
from medmoe_mcore.conversion.safetensors_io import AtomicDir, SafetensorsDir, write_sharded
from medmoe_mcore.conversion.tables.vision import (
    CLIP_WEIGHTS,
    LAYOUTS,
    PROJECTOR_WEIGHTS,
    Layout,
    clip_config_from_vision,
    detect_clip_root,
    detect_layout,
    feature_layer,
    is_unused_clip_key,
    relayout,
    vision_config_from_hf,
)
from medmoe_mcore.models.transformer_config import DTYPES
from medmoe_mcore.models.medmoe import MedMoEModel
from medmoe_mcore.models.specs.language import LOCAL

_PASSTHROUGH_FILE = "clip_unused.safetensors"
# CLIP ViT-L/14-336 (shared/REFERENCE.md), for the authors' checkpoints, whose config names the
# tower (`image_tower`) instead of carrying its config.
CLIP_L14_336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    intermediate_size=4096, image_size=336, patch_size=14, layer_norm_eps=1e-5,
                    hidden_act="quick_gelu", num_channels=3)
AUTHORS_MODEL_TYPES = {"llava_phi": "phi", "moe_llava_phi": "phi",
                       "llava_stablelm": "stablelm", "moe_llava_stablelm": "stablelm"}
AUTHORS_IMAGE_TOKEN = -200  # LLaVA's IMAGE_TOKEN_INDEX


def multimodal_table(cfg: ModelConfig, layout: Layout):
    """Vision + projector + language entries of `cfg` placed in `layout`."""
    return (
        *(Scoped(m, "vision.", (("", layout.vision),), cfg.vision) for m in CLIP_WEIGHTS),
        *(Scoped(m, "projector.", layout.projector, cfg.vision) for m in PROJECTOR_WEIGHTS),
        *(Scoped(m, "language_model.", layout.language_prefixes(), cfg.language)
          for m in weight_table(cfg)),
    )


def _raw_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _clip_config(clip_dir) -> dict:
    """The vision config of a CLIPVisionModel or CLIPModel folder."""
    raw = _raw_config(clip_dir)
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") != "clip_vision_model":
        raise ConfigError(f"{clip_dir}/config.json model_type={raw.get('model_type')!r}: "
                          "expected clip_vision_model or clip")
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict()


def read_multimodal_config(hf_dir, vision_hf_dir=None) -> tuple[ModelConfig, Layout, dict]:
    """(ModelConfig, layout, HF config to keep) of a LLaVA or authors' MoE-LLaVA folder."""
    raw = _raw_config(hf_dir)
    src = SafetensorsDir(hf_dir)
    layout = detect_layout(src.keys())
    if raw.get("model_type") == "llava":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True).to_dict()
        if hf.get("vision_feature_select_strategy") != "default":
            raise ConfigError(f"config.json vision_feature_select_strategy="
                              f"{hf.get('vision_feature_select_strategy')!r}: only 'default' "
                              "(CLS token dropped, as Med-MoE) is supported")
        if hf.get("projector_hidden_act") != "gelu" or not hf.get("multimodal_projector_bias",
                                                                    True):
            raise ConfigError("config.json projector: Med-MoE's mlp2x_gelu needs "
                              "projector_hidden_act='gelu' and multimodal_projector_bias=true")
        if not isinstance(hf.get("vision_feature_layer"), int):
            raise ConfigError(f"config.json vision_feature_layer="
                              f"{hf.get('vision_feature_layer')!r}: one integer layer only")
        text = hf["text_config"]
        lm = dataclasses.replace(language_config_from_hf(text), output_layer_bias=False)
        vision = vision_config_from_hf(hf["vision_config"], hf["vision_feature_layer"],
                                       hf["image_token_index"])
        return ModelConfig(language=lm, moe=moe_config_from_hf(text), vision=vision), layout, hf
    if raw.get("model_type") in AUTHORS_MODEL_TYPES:
        family = FAMILIES[AUTHORS_MODEL_TYPES[raw["model_type"]]]
        if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConfigError(f"config.json mm_projector_type={raw['mm_projector_type']!r}: "
                              "only mlp2x_gelu is supported")
        if raw["model_type"].startswith("moe_"):
            text = read_hf_config(hf_dir)
        else:  # the authors' dense stage-2 type: the family's own config keys
            text = hf_config_object({**raw, "model_type": family.hf_model_type}).to_dict()
        clip = _clip_config(vision_hf_dir) if vision_hf_dir else _authors_clip(raw)
        vision = vision_config_from_hf(clip, raw.get("mm_vision_select_layer", -2),
                                       AUTHORS_IMAGE_TOKEN)
        lm = language_config_from_hf(text)
        if "lm_head.bias" not in src.keys():
            lm = dataclasses.replace(lm, output_layer_bias=False)
        cfg = ModelConfig(language=lm, moe=moe_config_from_hf(text), vision=vision)
        return cfg, layout, {"text_config": text, "vision_config": clip}
    raise ConfigError(f"{hf_dir}/config.json model_type={raw.get('model_type')!r}: expected "
                      f"llava or one of {sorted(AUTHORS_MODEL_TYPES)}")


def _authors_clip(raw: dict) -> dict:
    tower = str(raw.get("image_tower") or raw.get("mm_image_tower") or "")
    if not tower.rstrip("/").endswith("clip-vit-large-patch14-336"):
        raise ConfigError(f"config.json image_tower={tower!r}: pass --vision-hf-dir with that "
                          "CLIP's config (only CLIP ViT-L/14-336 is built in)")
    return dict(CLIP_L14_336)


def _build(cfg: ModelConfig) -> MedMoEModel:
    parallel.initialize(cfg.parallel)
    # Parameters are left uninitialised (never touched), then swapped for converted tensors.
    return MedMoEModel(cfg, backend=LOCAL, perform_initialization=False)


def _fill(model, groups, get, cast, show_progress, desc):
    fill_parameters(model, convert(groups, get, None, to_megatron=True), cast,
                    _progress(len(groups), desc, show_progress))


def _split_clip(keys, root: str, v: VisionConfig, report: list[str]):
    """(keys to convert, keys kept aside relative to the CLIP root, keys dropped)."""
    convert_keys, aside, dropped = [], {}, []
    for key in keys:
        if key.startswith(root) and is_unused_clip_key(key[len(root):], v):
            aside[key[len(root):]] = key
        elif root and not key.startswith(root) and _CLIP_EXTRA.match(key):
            dropped.append(key)
        else:
            convert_keys.append(key)
    if aside:
        report.append(f"kept aside, not run ({len(aside)} CLIP tensors past feature layer "
                      f"{feature_layer(v)} or post_layernorm): written back on export")
    if dropped:
        report.append(f"dropped ({len(dropped)} tensors of CLIP's text tower/projections, not "
                      f"part of the vision tower): {', '.join(sorted(dropped)[:4])}...")
    return convert_keys, aside, dropped


_CLIP_EXTRA = re.compile(r"(text_model\.|visual_projection\.|text_projection\.|logit_scale)")


def _save(model, cfg, save_root, hf_cfg, aside: dict, tokenizer_dir=None) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        if aside:
            (Path(tmp) / PASSTHROUGH).mkdir()
            save_file({k: v.contiguous() for k, v in aside.items()},
                      str(Path(tmp) / PASSTHROUGH / _PASSTHROUGH_FILE))
            dirs[PASSTHROUGH] = Path(tmp) / PASSTHROUGH
        if tokenizer_dir is not None:
            copied = [n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).exists()]
            if copied:
                (Path(tmp) / "tok").mkdir()
                for name in copied:
                    (Path(tmp) / "tok" / name).write_bytes((Path(tokenizer_dir) / name)
                                                           .read_bytes())
                dirs[checkpointing.TOKENIZER] = Path(tmp) / "tok"
        return checkpointing.save(
            model.sharded_state_dict(), save_root, cfg,
            extra_files={checkpointing.HF_CONFIG: json.dumps(hf_cfg, indent=2)},
            extra_dirs=dirs or None)


def import_multimodal(hf_dir, save_root, params_dtype: str | None = None, vision_hf_dir=None,
                      show_progress=True, report: list[str] | None = None) -> Path:
    """HF LLaVA (or the authors' MoE-LLaVA) folder -> Megatron dist checkpoint."""
    report = [] if report is None else report
    cfg, layout, hf_cfg = read_multimodal_config(hf_dir, vision_hf_dir)
    src = SafetensorsDir(hf_dir)
    cfg.params_dtype = params_dtype or _storage_dtype(src)
    cfg.validate()
    keys, aside_keys, _ = _split_clip(src.keys(), layout.vision, cfg.vision, report)
    model = _build(cfg)
    groups = plan(multimodal_table(cfg, layout), keys, _weights(model).keys(), to_megatron=True)
    _fill(model, groups, src.get, DTYPES[params_dtype] if params_dtype else None,
          show_progress, f"{layout.name} -> Megatron")
    report.insert(0, f"layout {layout.name}: {len(keys)} tensors converted")
    return _save(model, cfg, save_root, hf_cfg, {k: src.get(v) for k, v in aside_keys.items()},
                 tokenizer_dir=hf_dir)


def _projector_tensors(path) -> dict[str, torch.Tensor]:
    """A projector file (safetensors): HF LLaVA or the authors' names, any prefix."""
    names = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}
    pattern = re.compile(r"(?:.*?(?:mm_projector|multi_modal_projector)\.)?"
                         r"(0|2|linear_1|linear_2)\.(weight|bias)\Z")
    out, unknown = {}, []
    for key, tensor in load_file(str(path)).items():
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
             image_token_id: int = AUTHORS_IMAGE_TOKEN, vision_feature_layer: int = -2,
             params_dtype: str | None = None, lm_head_bias: bool = True, seed: int = 1234,
             show_progress=True, report: list[str] | None = None) -> Path:
    """Stage-1 starting point from public parts: CLIP + Phi-2/StableLM (+ projector file, else
    freshly initialised like Megatron: normal(0, 0.02) weights, zero biases)."""
    report = [] if report is None else report
    clip_src, lm_src = SafetensorsDir(vision_hf_dir), SafetensorsDir(language_hf_dir)
    text = read_hf_config(language_hf_dir)
    lm = language_config_from_hf(text)
    if lm.output_layer_bias and not lm_head_bias:
        lm = dataclasses.replace(lm, output_layer_bias=False)
        report.append("dropped lm_head.bias (as the authors' LlavaPhi; HF LLaVA has none)")
    vision = vision_config_from_hf(_clip_config(vision_hf_dir), vision_feature_layer,
                                   image_token_id)
    dtype = params_dtype or _storage_dtype(lm_src)
    cfg = ModelConfig(language=lm, moe=moe_config_from_hf(text), vision=vision,
                      params_dtype=dtype).validate()
    root = detect_clip_root(clip_src.keys())
    # One key space for both folders: "clip/..." and "lm/...".
    layout = Layout("parts", "clip/" + root, (("linear_1.", "proj/linear_1."),
                                              ("linear_2.", "proj/linear_2.")),
                    "lm/model.", "lm/lm_head.")
    clip_keys, aside_keys, _ = _split_clip(clip_src.keys(), root, vision, report)
    sources = {"clip/" + k: (clip_src.get, k) for k in clip_keys}
    sources.update({"lm/" + k: (lm_src.get, k) for k in lm_src.keys()
                    if lm_head_bias or k != "lm_head.bias"})
    projector = _projector_tensors(projector_path) if projector_path else None
    if projector is not None:
        sources.update({"proj/" + k: (projector.__getitem__, k) for k in projector})
    model = _build(cfg)
    expected = [k for k in _weights(model) if projector is not None
                or not k.startswith("projector.")]
    groups = plan(multimodal_table(cfg, layout), sources, expected, to_megatron=True)
    _fill(model, groups, lambda k: sources[k][0](sources[k][1]), DTYPES[params_dtype]
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
    hf_cfg = {"text_config": text, "vision_config": _clip_config(vision_hf_dir)}
    return _save(model, cfg, save_root, hf_cfg,
                 {k: clip_src.get(v) for k, v in aside_keys.items()},
                 tokenizer_dir=language_hf_dir)


def llava_config(cfg: ModelConfig, base: dict | None) -> dict:
    """HF LlavaConfig dict of a dense checkpoint; refuses what LLaVA cannot express."""
    lm, v = cfg.language, cfg.vision
    if cfg.moe is not None:
        raise ConfigError("an MoE checkpoint cannot be written as HF LlavaForConditionalGeneration "
                          "(dense only); export the language model with convert_mcore_to_hf")
    if lm.output_layer_bias:
        raise ConfigError("language.output_layer_bias=True: HF LlavaForConditionalGeneration has "
                          "no LM-head bias (assemble with --no-lm-head-bias, as the authors do)")
    if v.image_token_id < 0:
        raise ConfigError(f"vision.image_token_id={v.image_token_id} is a sentinel outside the "
                          "vocabulary; HF LLaVA needs a vocabulary token for <image>")
    family = FAMILIES[lm.family]
    text = hf_config_from_language(
        dataclasses.replace(lm, output_layer_bias=family.block["output_layer_bias"]),
        (base or {}).get("text_config"))
    return dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
                text_config=text, vision_config=clip_config_from_vision(v),
                vision_feature_layer=feature_layer(v), vision_feature_select_strategy="default",
                projector_hidden_act="gelu", multimodal_projector_bias=True,
                image_token_index=v.image_token_id, image_seq_length=v.num_patches,
                torch_dtype=cfg.params_dtype)


def _expected_llava_keys(hf_cfg: dict, layout: Layout) -> set[str]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {relayout(k, LAYOUTS["llava-modular"], layout) for k in model.state_dict()}


def export_llava(load_root, hf_dir, overwrite=False, show_progress=True,
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Megatron multimodal checkpoint -> HF LlavaForConditionalGeneration folder."""
    folder = checkpointing.resolve(load_root)
    cfg = checkpointing.read_config(folder, ParallelConfig())
    base = folder / checkpointing.HF_CONFIG
    aside_file = folder / PASSTHROUGH / _PASSTHROUGH_FILE
    aside = load_file(str(aside_file)) if aside_file.exists() else {}
    if not aside and (cfg.vision.source_num_layers or 0) > cfg.vision.num_layers:
        # Nothing kept aside (not imported from HF): write only the layers that run.
        cfg.vision.source_num_layers = None
    hf_cfg = llava_config(cfg, json.loads(base.read_text()) if base.exists() else None)
    if not aside:
        h = cfg.vision.hidden_size  # identity post_layernorm: LLaVA never runs it
        aside = {"post_layernorm.weight": torch.ones(h, dtype=DTYPES[cfg.params_dtype]),
                 "post_layernorm.bias": torch.zeros(h, dtype=DTYPES[cfg.params_dtype])}
    layout = LAYOUTS["llava"]
    model = _build(cfg)
    checkpointing.load_into(model, folder)
    state = _weights(model)
    expected = _expected_llava_keys(hf_cfg, layout) - {layout.vision + k for k in aside}
    groups = plan(multimodal_table(cfg, layout), state.keys(), expected, to_megatron=False)

    def tensors():
        yield from convert(groups, state.__getitem__, None, to_megatron=False)
        for key, tensor in aside.items():
            yield layout.vision + key, tensor

    with AtomicDir(hf_dir, overwrite=overwrite) as out:
        bar = _progress(sum(len(g.targets) for g in groups) + len(aside), "Megatron -> LLaVA",
                        show_progress)
        write_sharded(tensors(), out, max_shard_bytes=max_shard_bytes,
                      progress=lambda _: bar.update())
        bar.close()
        from transformers import LlavaConfig

        LlavaConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"}) \
            .save_pretrained(str(out))
        tok = folder / checkpointing.TOKENIZER
        if tok.is_dir():
            for item in tok.iterdir():
                (out / item.name).write_bytes(item.read_bytes())
    return Path(hf_dir)


def is_multimodal(hf_dir) -> bool:
    """Whether an HF folder holds a vision tower in one of the LLaVA layouts."""
    keys = set(SafetensorsDir(hf_dir).keys())
    return any(layout.vision + "embeddings.patch_embedding.weight" in keys
               for layout in LAYOUTS.values())
