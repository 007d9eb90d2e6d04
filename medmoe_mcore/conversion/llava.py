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
from safetensors.torch import save_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.checkpoint.store import PASSTHROUGH
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import VISION_FLAVORS
from medmoe_mcore.config.model import ModelConfig, ParallelConfig, VisionConfig
from medmoe_mcore.conventions import IMAGE_SENTINEL_ID
from medmoe_mcore.conversion.engine import convert, plan
from medmoe_mcore.conversion.hf_config import (hf_config_from_language, language_config_from_hf,
                                               moe_config_from_hf)
from medmoe_mcore.conversion.hf_files import (check_tokenizer, copy_tokenizer, raw_config,
                                             read_hf_config)
from medmoe_mcore.conversion.mappings import Scoped
from medmoe_mcore.conversion.peft_adapter import lora_table, read_peft_adapter, targets_of
from medmoe_mcore.conversion.preflight import checked_plan
from medmoe_mcore.conversion import hf_folder
from medmoe_mcore.conversion.hf_folder import open_weights
from medmoe_mcore.conversion.safetensors_io import AtomicDir, read_file, write_sharded
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.conversion.tables.vision import (CLIP_WEIGHTS, LAYOUTS, PROJECTOR_WEIGHTS, Layout,
                                                   clip_config_from_vision, detect_layout,
                                                   feature_layer, is_unused_clip_key, relayout,
                                                   vision_config_from_hf)
from medmoe_mcore.conversion.target_model import (conversion_model, fill_parameters, progress,
                                                  storage_dtype, weight_table, weights,
                                                  without_zero_head_bias)
from medmoe_mcore.models.transformer_config import DTYPES

PASSTHROUGH_FILE = "clip_unused.safetensors"
AUTHORS_MODEL_TYPES = {t: f.name for f in FAMILIES.values()
                       for t in (f.hf_llava_model_type, f.hf_moe_model_type)}


def multimodal_table(cfg: ModelConfig, layout: Layout):
    """Vision + projector + language entries of `cfg` placed in `layout`."""
    return (
        *(Scoped(m, "vision.", (("", layout.vision),), cfg.vision) for m in CLIP_WEIGHTS),
        *(Scoped(m, "projector.", layout.projector, cfg.vision) for m in PROJECTOR_WEIGHTS),
        *(Scoped(m, "language_model.", layout.language_prefixes(), cfg.language)
          for m in weight_table(cfg)),
    )


def clip_config(clip_dir) -> dict:
    """The vision config of a CLIPVisionModel or CLIPModel folder."""
    raw = raw_config(clip_dir)
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") != "clip_vision_model":
        raise ConfigError(f"{clip_dir}/config.json model_type={raw.get('model_type')!r}: "
                          "expected clip_vision_model or clip")
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict()


def read_multimodal_config(hf_dir, vision_hf_dir=None) -> tuple[ModelConfig, Layout, dict]:
    """(ModelConfig, layout, HF config to keep) of a LLaVA or authors' MoE-LLaVA folder."""
    raw = raw_config(hf_dir)
    src = open_weights(hf_dir)
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
        for key, value in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature",
                                                                  "patch")):
            if raw.get(key, value) != value:
                raise ConfigError(f"config.json {key}={raw[key]!r}: only {value!r} is supported")
        text = read_hf_config(hf_dir)
        clip = clip_config(vision_hf_dir) if vision_hf_dir else raw.get("vision_config") \
            or _authors_clip(raw)
        vision = vision_config_from_hf(clip, raw.get("mm_vision_select_layer", -2),
                                       raw.get("image_token_index", IMAGE_SENTINEL_ID))
        lm = language_config_from_hf(text)
        cfg = ModelConfig(language=lm, moe=moe_config_from_hf(text), vision=vision)
        return cfg, layout, {"text_config": text, "vision_config": clip}
    raise ConfigError(f"{hf_dir}/config.json model_type={raw.get('model_type')!r}: expected "
                      f"llava or one of {sorted(AUTHORS_MODEL_TYPES)}")


def _authors_clip(raw: dict) -> dict:
    tower = str(raw.get("image_tower") or raw.get("mm_image_tower") or "")
    if not tower.rstrip("/").endswith("clip-vit-large-patch14-336"):
        raise ConfigError(f"config.json image_tower={tower!r}: pass --vision-hf-dir with that "
                          "CLIP's config (only CLIP ViT-L/14-336 is built in)")
    # The authors' config names the tower instead of carrying its config: the built-in one.
    return clip_config_from_vision(VISION_FLAVORS["clip_vit_l14_336"])


def fill(model, groups, get, cast, show_progress, desc):
    fill_parameters(model, convert(groups, get, None, to_megatron=True), cast,
                    progress(len(groups), desc, show_progress))


def split_clip(keys, root: str, v: VisionConfig, report: list[str]):
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


def save_multimodal(model, cfg, save_root, hf_cfg, aside: dict, tokenizer_dir=None,
                    overwrite: bool = False) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        if aside:
            (Path(tmp) / PASSTHROUGH).mkdir()
            save_file({k: v.contiguous() for k, v in aside.items()},
                      str(Path(tmp) / PASSTHROUGH / PASSTHROUGH_FILE))
            dirs[PASSTHROUGH] = Path(tmp) / PASSTHROUGH
        if tokenizer_dir is not None:
            if copy_tokenizer(tokenizer_dir, Path(tmp) / "tok"):
                dirs[store.TOKENIZER] = Path(tmp) / "tok"
        return store.save(
            model.sharded_state_dict(), save_root, cfg,
            extra_files={store.HF_CONFIG: json.dumps(hf_cfg, indent=2)},
            extra_dirs=dirs or None, overwrite=overwrite)


def import_multimodal(hf_dir, save_root, params_dtype: str | None = None, vision_hf_dir=None,
                      show_progress=True, report: list[str] | None = None,
                      overwrite: bool = False, peft_adapter_dir=None,
                      tokenizer: bool = True) -> Path:
    """HF LLaVA (or the authors' MoE-LLaVA) folder -> Megatron dist checkpoint; with a PEFT
    adapter folder (ours, conversion/peft_adapter.py) a LoRA checkpoint."""
    store.check_can_release(save_root, overwrite)
    report = [] if report is None else report
    hf_dir = hf_folder.resolve(hf_dir)
    vision_hf_dir = None if vision_hf_dir is None else hf_folder.resolve(vision_hf_dir)
    cfg, layout, hf_cfg = read_multimodal_config(hf_dir, vision_hf_dir)
    if tokenizer:
        check_tokenizer(hf_dir, cfg.language.vocab_size)
    src = open_weights(hf_dir)
    cfg.params_dtype = params_dtype or storage_dtype(src)
    cfg.validate()
    keys, aside_keys, _ = split_clip(src.keys(), layout.vision, cfg.vision, report)
    table, get = multimodal_table(cfg, layout), src.get
    if peft_adapter_dir is not None:
        lora, adapters = read_peft_adapter(peft_adapter_dir)
        lora_groups = plan(lora_table(table), adapters, None, to_megatron=True)
        lora.target_modules = targets_of(t for g in lora_groups for t in g.targets)
        cfg.lora = lora
        cfg.validate()
        dtype = DTYPES[cfg.params_dtype]
        table, keys = (*table, *lora_table(table)), [*keys, *adapters]
        get = lambda key: adapters[key].to(dtype) if key in adapters else src.get(key)  # noqa: E731
        report.append(f"LoRA adapter {peft_adapter_dir}: rank {lora.rank}, alpha "
                      f"{lora.alpha:g} on {', '.join(lora.target_modules)} "
                      f"({len(adapters)} tensors)")
    meta_get = (lambda key: adapters[key].to("meta", DTYPES[cfg.params_dtype])  # noqa: E731
                if peft_adapter_dir is not None and key in adapters else src.meta(key))
    groups = checked_plan(cfg, table, keys, meta_get, str(hf_dir))
    model = conversion_model(cfg)
    fill(model, groups, get, DTYPES[params_dtype] if params_dtype else None,
         show_progress, f"{layout.name} -> Megatron")
    report.insert(0, f"layout {layout.name}: {len(keys)} tensors converted")
    return save_multimodal(model, cfg, save_root, hf_cfg, {k: src.get(v) for k, v in aside_keys.items()},
                 tokenizer_dir=hf_dir if tokenizer else None, overwrite=overwrite)


def llava_config(cfg: ModelConfig, base: dict | None, drop_lm_head_bias: bool = False) -> dict:
    """HF LlavaConfig dict of a dense checkpoint; refuses what LLaVA cannot express."""
    lm, v = cfg.language, cfg.vision
    if cfg.moe is not None:
        raise ConfigError("an MoE checkpoint cannot be written as HF LlavaForConditionalGeneration "
                          "(dense only); export it as a Med-MoE release (--format medmoe, the "
                          "default), which keeps every expert")
    if lm.output_layer_bias and not drop_lm_head_bias:
        raise ConfigError("language.output_layer_bias=True: HF LlavaForConditionalGeneration has "
                          "no LM-head bias. Choose: --drop-lm-head-bias (every logit loses its "
                          "bias), or --format medmoe (keeps it, with our classes)")
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


def kept_aside(folder: Path, cfg: ModelConfig) -> dict:
    """The CLIP tensors an HF import kept aside; for a model never imported, only the layers
    that run are written (`cfg` is changed so) plus an identity post_layernorm (never run)."""
    aside_file = folder / PASSTHROUGH / PASSTHROUGH_FILE
    if aside_file.exists():
        return read_file(aside_file)
    cfg.vision.source_num_layers = None
    h, dtype = cfg.vision.hidden_size, DTYPES[cfg.params_dtype]
    return {"post_layernorm.weight": torch.ones(h, dtype=dtype),
            "post_layernorm.bias": torch.zeros(h, dtype=dtype)}


def write_weights(out: Path, state: dict, cfg: ModelConfig, layout: Layout, expected: set,
                  aside: dict, desc: str, show_progress: bool, max_shard_bytes: int) -> None:
    """The model's tensors in `layout` (every expected key, nothing else) + those kept aside."""
    expected = expected - {layout.vision + k for k in aside}
    groups = plan(multimodal_table(cfg, layout), state.keys(), expected, to_megatron=False)

    def tensors():
        yield from convert(groups, state.__getitem__, None, to_megatron=False)
        for key, tensor in aside.items():
            yield layout.vision + key, tensor

    bar = progress(sum(len(g.targets) for g in groups) + len(aside), desc, show_progress)
    write_sharded(tensors(), out, max_shard_bytes=max_shard_bytes,
                  progress=lambda _: bar.update())
    bar.close()


def export_llava(load_root, hf_dir, overwrite=False, show_progress=True,
                 max_shard_bytes: int = 2 << 30, drop_lm_head_bias: bool = False) -> Path:
    """Megatron multimodal checkpoint -> HF LlavaForConditionalGeneration folder (dense only;
    an LM-head bias is dropped only when asked)."""
    folder = store.resolve(load_root)
    cfg = store.read_config(folder, ParallelConfig())
    base = folder / store.HF_CONFIG
    base_cfg = json.loads(base.read_text()) if base.exists() else None
    aside = kept_aside(folder, cfg)
    llava_config(cfg, base_cfg, drop_lm_head_bias=True)  # what LLaVA refuses, before loading
    layout = LAYOUTS["llava"]
    model = conversion_model(cfg)
    store.load_into(model, folder)
    state = weights(model)
    cfg = without_zero_head_bias(cfg, state)  # an all-zero bias needs no --drop-lm-head-bias
    hf_cfg = llava_config(cfg, base_cfg, drop_lm_head_bias)
    if drop_lm_head_bias:
        state.pop("language_model.output_layer.bias", None)
    with AtomicDir(hf_dir, overwrite=overwrite) as out:
        write_weights(out, state, cfg, layout, _expected_llava_keys(hf_cfg, layout), aside,
                      "Megatron -> LLaVA", show_progress, max_shard_bytes)
        from transformers import LlavaConfig

        LlavaConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"}) \
            .save_pretrained(str(out))
        copy_tokenizer(folder / store.TOKENIZER, out)
    return Path(hf_dir)


def is_multimodal(hf_dir) -> bool:
    """Whether an HF folder holds a vision tower in one of the LLaVA layouts."""
    keys = set(open_weights(hf_folder.resolve(hf_dir)).keys())
    return any(layout.vision + "embeddings.patch_embedding.weight" in keys
               for layout in LAYOUTS.values())
