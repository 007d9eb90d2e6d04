"""Megatron multimodal checkpoint of any stage -> a release folder in the authors' MoE-LLaVA
layout (`model.image_tower.image_tower.vision_model.*`, `model.mm_projector.{0,2}.*`,
`model.layers.{i}.mlp.deepspeed_moe.*`, `...meta_moe.*`, `lm_head.*`) that runs on its own:

- our `transformers` classes (`auto_map`: AutoConfig, AutoModelForCausalLM) beside the weights;
- the tokenizer with `<image>` and the phi/stablelm conversation template as chat template,
  CLIP's image processor config and a LlavaProcessor (AutoProcessor loads the three);
- a config the authors' code reads too: their model types and `moe` dict, the legacy
  top-level rotary/norm keys of their transformers-4.37 classes, `mm_*` keys, a true dtype.

A model the authors' code would compute differently is refused, naming the field, unless the
caller accepts the divergence; then the folder's model card (README.md) lists what differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from medmoe_mcore import hf as hf_classes
from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.conventions import EOS, IMAGE_TOKEN, SYSTEM_PROMPT
from medmoe_mcore.conversion.hf_config import hf_config_from_language
from medmoe_mcore.conversion.hf_files import write_config
from medmoe_mcore.conversion.llava import kept_aside, multimodal_table, write_weights
from medmoe_mcore.conversion.lora_merge import merged_model
from medmoe_mcore.conversion.model_card import model_card, read_eval_report
from medmoe_mcore.conversion.peft_adapter import write_peft_adapter
from medmoe_mcore.conversion.safetensors_io import AtomicDir
from medmoe_mcore.conversion.tables.vision import LAYOUTS, clip_config_from_vision, feature_layer
from medmoe_mcore.conversion.target_model import (conversion_model, weights,
                                                  without_zero_head_bias)

# The phi / stablelm conversation format (conventions.py) as a chat template: messages with
# string content or processor-style [{"type": "image"}, {"type": "text", ...}] lists.
CHAT_TEMPLATE = (
    '{{- "' + SYSTEM_PROMPT + '" -}}'
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is string -%}{%- set text = content -%}{%- set images = 0 -%}"
    "{%- else -%}{%- set text = content | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set images = content | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' USER: ' + ('" + IMAGE_TOKEN + "\\n' * images) + text | trim + ' ASSISTANT:' -}}"
    "{%- else -%}{{- ' ' + text | trim + '" + EOS + "' -}}{%- endif -%}"
    "{%- endfor -%}")

# (field, does the model differ from the authors' code?, what their code does instead)
AUTHORS_SEMANTICS = (
    ("moe.routing_granularity", lambda c: c.moe and c.moe.routing_granularity != "token",
     "their router routes every token by its own hidden state"),
    ("moe.meta_expert", lambda c: c.moe and not c.moe.meta_expert,
     "their MoE layer always adds the meta expert"),
    ("moe.router_type", lambda c: c.moe and c.moe.router_type == "learned"
     and not c.language.add_bias_linear, "their gate.wg is a Linear with bias"),
    ("moe.router_topk", lambda c: c.moe and c.moe.router_topk > 2,
     "their code routes to the top-1 or top-2 experts"),
    ("moe.renormalize", lambda c: c.moe and c.moe.renormalize != (c.moe.router_topk == 2),
     "their top-2 renormalises the two weights, their top-1 takes the raw probability"),
    ("language.output_layer_bias", lambda c: c.language.output_layer_bias,
     "their LlavaPhi / MoELLaVAPhi have no LM-head bias"),
)


def authors_divergences(cfg: ModelConfig) -> list[str]:
    """'field=value: what the authors' code does' for every way `cfg` computes differently."""
    out = []
    for name, differs, theirs in AUTHORS_SEMANTICS:
        if differs(cfg):
            part, attr = name.split(".")
            out.append(f"{name}={getattr(getattr(cfg, part), attr)!r}: {theirs}")
    return out


def release_config(cfg: ModelConfig, base: dict | None, image_token_index: int) -> dict:
    """config.json of the release: the language model's config (ours + legacy keys) and the
    authors' multimodal keys."""
    v = cfg.vision
    hf = hf_config_from_language(cfg.language, (base or {}).get("text_config"), cfg.moe,
                                 multimodal=True)
    builtin = (v.hidden_size, v.image_size, v.patch_size) == (1024, 336, 14)
    # Descriptive keys an imported config had are kept as they were.
    hf.setdefault("image_tower", "openai/clip-vit-large-patch14-336" if builtin else None)
    hf.setdefault("image_aspect_ratio", "pad")
    hf.update(
        vision_config=clip_config_from_vision(v), mm_hidden_size=v.hidden_size,
        mm_vision_select_layer=feature_layer(v), mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        image_token_index=image_token_index, torch_dtype=cfg.params_dtype)
    return hf


def write_processor(out: Path, cfg: ModelConfig, tokenizer_dir: Path) -> dict:
    """Tokenizer (+ `<image>`, chat template), CLIPImageProcessor and LlavaProcessor configs;
    returns the config keys of the tokenizer's `<image>`, EOS and padding ids."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise ConfigError(f"{tokenizer_dir}: no HF tokenizer (tokenizer_config.json); a release "
                          "needs one that AutoTokenizer loads (pass --tokenizer HF_FOLDER)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    v = cfg.vision
    if v.image_token_id >= 0 and v.image_token_id != image_id:
        raise ConfigError(f"vision.image_token_id={v.image_token_id} but the tokenizer's "
                          f"{IMAGE_TOKEN} is {image_id}")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size,
                                                         "width": v.image_size},
        do_center_crop=True, resample=3, image_mean=list(v.image_mean),
        image_std=list(v.image_std), do_convert_rgb=True)
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=v.patch_size,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1) \
        .save_pretrained(str(out))
    image_processor.save_pretrained(str(out))  # preprocessor_config.json: transformers 4 too
    tok_config = out / "tokenizer_config.json"
    written = json.loads(tok_config.read_text())
    # Written by transformers 5, read by 4 and 5: its generic fast tokenizer under the name
    # both know, and the special-token list under the key both read.
    if written.get("tokenizer_class") == "TokenizersBackend":
        written["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(written.get("extra_special_tokens"), list):
        written["additional_special_tokens"] = written.pop("extra_special_tokens")
    written["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids
    tok_config.write_text(json.dumps(written, indent=2) + "\n")
    eos = tok.convert_tokens_to_ids(EOS)
    return {"image_token_index": image_id, "eos_token_id": eos,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}


def _expected_keys(hf_cfg: dict) -> set[str]:
    """State-dict keys of our HF class for `hf_cfg`, built on the meta device."""
    from medmoe_mcore.conversion.hf_files import hf_config_object

    with torch.device("meta"):
        model = hf_classes.model_class(hf_cfg["model_type"])(hf_config_object(hf_cfg))
    return set(model.state_dict())


def _card_sections(divergences: list[str], adapter_dir=None) -> list[str]:
    """The model card's sections about this export: a LoRA base, divergences accepted."""
    lines = []
    if adapter_dir is not None:
        lines += ["## The base model of a LoRA training", "",
                  "These weights are the model the LoRA adapters were trained on (its "
                  "projector as trained); the trained model is this folder plus the PEFT "
                  f"adapter written to `{adapter_dir}`: "
                  "`peft.PeftModel.from_pretrained(model, adapter_dir)`.", ""]
    if divergences:
        lines += ["## The authors' MoE-LLaVA code will compute this model differently", "",
                  "Exported on request although their code differs in:", "",
                  *(f"- {d}" for d in divergences), "",
                  "Use the classes in this folder (auto_map) for the model as trained.", ""]
    return lines


def _check_lora_choice(cfg: ModelConfig, folder: Path, lora_merge: bool,
                       peft_adapter_dir) -> None:
    """A LoRA checkpoint exports merged or as base + PEFT adapter, as asked; the LoRA flags
    on a checkpoint without adapters are refused."""
    given = [f for f, v in (("--lora-merge", lora_merge),
                            ("--peft-adapter-dir", peft_adapter_dir is not None)) if v]
    if cfg.lora is None and given:
        raise ConfigError(f"{', '.join(given)}: {folder} has no LoRA adapters")
    if cfg.lora is not None and len(given) != 1:
        raise ConfigError(f"{folder} holds LoRA adapters (rank {cfg.lora.rank}): choose "
                          "--lora-merge (one release with the adapters merged) or "
                          "--peft-adapter-dir DIR (the base release + a PEFT adapter)")


def export_release(load_root, hf_dir, overwrite: bool = False, accept_divergence: bool = False,
                   tokenizer_dir=None, show_progress: bool = True,
                   max_shard_bytes: int = 2 << 30, lora_merge: bool = False,
                   peft_adapter_dir=None, eval_report=None, card_datasets=None,
                   license=None) -> Path:
    """Megatron multimodal checkpoint (dense or Med-MoE) -> release folder (authors' layout)
    with its model card (conversion/model_card.py; `eval_report` the JSON of
    `tools/evaluate.py score --report`). A LoRA checkpoint: merged (`lora_merge`), or the base
    model + a PEFT adapter folder."""
    report = read_eval_report(eval_report) if eval_report is not None else None
    folder = store.resolve(load_root)
    cfg = store.read_config(folder, ParallelConfig())
    if cfg.vision is None:
        raise ConfigError(f"{folder}: a text-only checkpoint (export it with "
                          "conversion.language.export_hf)")
    _check_lora_choice(cfg, folder, lora_merge, peft_adapter_dir)
    if peft_adapter_dir is not None and Path(hf_dir).resolve() in \
            (Path(peft_adapter_dir).resolve(), *Path(peft_adapter_dir).resolve().parents):
        raise ConfigError(f"--peft-adapter-dir {peft_adapter_dir}: must lie outside --hf-dir "
                          f"{hf_dir} (each folder is written whole)")
    model = conversion_model(cfg)
    store.load_into(model, folder)
    if lora_merge:
        model = merged_model(model, cfg)[0]
    state = weights(model)
    cfg = without_zero_head_bias(cfg, state)
    divergences = authors_divergences(cfg)
    if divergences and not accept_divergence:
        raise ConfigError("the authors' MoE-LLaVA code would compute this model differently: "
                          + "; ".join(divergences) + " (pass --accept-authors-divergence to "
                          "export anyway; the model card then says so)")
    aside = kept_aside(folder, cfg)
    base = folder / store.HF_CONFIG
    base_cfg = json.loads(base.read_text()) if base.exists() else None
    adapters = {k: state.pop(k) for k in [k for k in state if ".lora." in k]}
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else folder / store.TOKENIZER
    hf_cfg = release_config(cfg, base_cfg, cfg.vision.image_token_id)
    expected = _expected_keys(hf_cfg)
    if adapters:
        with AtomicDir(peft_adapter_dir, overwrite=overwrite) as adapter_out:
            write_peft_adapter(adapter_out, adapters, cfg,
                               multimodal_table(cfg, LAYOUTS["authors"]), expected)
    with AtomicDir(hf_dir, overwrite=overwrite) as out:
        hf_cfg.update(write_processor(out, cfg, tokenizer_dir))
        write_weights(out, state, cfg, LAYOUTS["authors"], expected,
                      aside, "Megatron -> release", show_progress, max_shard_bytes)
        write_config(out, hf_cfg)
        for path in hf_classes.REMOTE_CODE_FILES:
            shutil.copy(path, out / path.name)
        history = folder / store.TRAINING_STAGES
        stages = json.loads(history.read_text()) if history.exists() else []
        (out / "README.md").write_text(model_card(
            cfg, Path(hf_dir).name, stages, report, card_datasets, license,
            _card_sections(divergences, peft_adapter_dir)))
    return Path(hf_dir)
