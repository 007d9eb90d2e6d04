"""Helpers every conversion shares: HF config reading, the weight table of a config, the
model to convert into, parameter filling, storage dtype, tokenizer files, progress bars.

Conversions build models at TP=1/EP=1 in one process (the result loads at any TP/EP); the
process groups are the entry point's to create (`runtime.parallel.initialize`), never ours.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from medmoe_mcore import hf as hf_classes
from medmoe_mcore.config import ConfigError, ModelConfig
from medmoe_mcore.conversion.engine import ConversionError
from medmoe_mcore.conversion.hf_config import family_of_hf, with_modern_keys
from medmoe_mcore.conversion.safetensors_io import SafetensorsDir
from medmoe_mcore.conversion.tables.language import FAMILIES
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.backends import LOCAL
from medmoe_mcore.models.transformer_config import DTYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def raw_config(hf_dir) -> dict:
    """config.json of an HF folder, as written."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return raw


# Keys any transformers 4.x/5.x config may carry (PretrainedConfig's own and generation's).
GENERIC_CONFIG_KEYS = frozenset((
    "_name_or_path", "add_cross_attention", "architectures", "auto_map", "bad_words_ids",
    "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "dtype", "early_stopping", "encoder_no_repeat_ngram_size", "eos_token_id",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
    "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type",
    "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
    "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version",
    "typical_p", "use_bfloat16", "use_cache"))
# The authors' MoE-LLaVA multimodal and training keys (read where they matter, else inert)
# and ours (hf/configuration_medmoe.py).
MEDMOE_CONFIG_KEYS = frozenset((
    "image_aspect_ratio", "image_grid_pinpoints", "image_projector_type", "image_tower",
    "video_tower", "mm_image_tower", "mm_video_tower", "mm_hidden_size", "mm_projector_type",
    "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature",
    "mm_vision_select_layer", "mm_projector_lr", "tokenizer_model_max_length",
    "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
    "X", "lora", "moe", "lm_head_bias", "vision_config", "image_token_index"))


def check_known_keys(raw: dict, where: str) -> None:
    """Refuse config keys this converter does not understand, rather than guess."""
    from transformers import AutoConfig

    family = family_of_hf(raw)
    known = set(AutoConfig.for_model(family.hf_model_type).to_dict()) | GENERIC_CONFIG_KEYS \
        | MEDMOE_CONFIG_KEYS | {legacy for legacy, _ in family.legacy_config_keys}
    unknown = sorted(set(raw) - known - {"rope_scaling"})
    if unknown:
        raise ConfigError(f"{where}: config keys {unknown} are not understood by this "
                          f"converter ({family.name} family); refusing to guess their meaning")
    if raw.get("rope_scaling") is not None:
        raise ConfigError(f"{where}: rope_scaling={raw['rope_scaling']!r} is not supported")


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The HF config as a dict: every key known (else refused), legacy keys read, normalised
    by transformers (authors' model types: our classes, never the folder's code)."""
    raw = raw_config(hf_dir)
    family_of_hf(raw)  # a clear error before transformers' own
    check_known_keys(raw, f"{hf_dir}/config.json")
    return hf_config_object(raw).to_dict()


def hf_config_object(hf_cfg: dict):
    """The `transformers` config object of a config dict (authors' types: our classes);
    legacy top-level keys are read first."""
    from transformers import AutoConfig

    hf_cfg = with_modern_keys(hf_cfg)
    fields = {k: v for k, v in hf_cfg.items() if k != "model_type"}
    if hf_cfg["model_type"] in hf_classes.CLASSES:
        return hf_classes.config_class(hf_cfg["model_type"])(**fields)
    return AutoConfig.for_model(hf_cfg["model_type"], **fields)


def weight_table(cfg: ModelConfig):
    """The language model's mapping table (dense or Med-MoE) of `cfg`'s family."""
    family = FAMILIES[cfg.language.family]
    return family.moe_weights if cfg.moe is not None else family.weights


def conversion_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model a conversion fills: local backend, parameters left uninitialised (every one
    is swapped for a converted tensor), in the process groups the entry point made at TP=1."""
    if not parallel_state.model_parallel_is_initialized():
        raise ConfigError("conversion needs Megatron's process groups: initialise them first "
                          "(runtime.parallel.initialize(ParallelConfig()))")
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size())
    if layout != (1, 1):
        raise ConfigError(f"conversion runs at TP=1/EP=1 (the result loads at any layout); "
                          f"the process groups have TP={layout[0]}, EP={layout[1]}")
    return build_model(cfg, backend=LOCAL, perform_initialization=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without Megatron's (empty) `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


def storage_dtype(src: SafetensorsDir) -> str:
    """The one dtype of a folder's tensors; refuses a mix (name one tensor of each)."""
    dtypes = src.dtypes()
    kinds = sorted({str(d) for d in dtypes.values()})
    if len(kinds) != 1 or next(iter(dtypes.values())) not in DTYPE_NAMES:
        by = {}
        for key, d in dtypes.items():
            by.setdefault(str(d), key)
        raise ConversionError(f"{src.folder}: tensors of several or unsupported dtypes "
                              f"{by} (pass --params-dtype to cast)")
    return DTYPE_NAMES[next(iter(dtypes.values()))]


def progress(total, desc, enabled=True):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def fill_parameters(model, tensors, cast, bar) -> None:
    """Swap each (key, tensor) into the model's parameter of that name, shapes checked."""
    params = dict(model.named_parameters())
    for key, tensor in tensors:
        param = params[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConversionError(f"{key}: converted shape {tuple(tensor.shape)} != model shape "
                                  f"{tuple(param.shape)}")
        param.data = tensor.to(cast) if cast is not None else tensor
        bar.update()
    bar.close()


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of `src` (an HF folder or a checkpoint's tokenizer/) into
    `dst`; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy(src / name, dst / name)
    return copied
