"""What an HF folder holds besides its weights: config.json read strictly (every key known,
legacy keys read, normalised by transformers with our classes for the authors' model types) and
the tokenizer files carried with a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from medmoe_mcore import hf as hf_classes
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conversion.hf_config import family_of_hf, with_modern_keys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")


def write_config(out, hf_cfg: dict) -> None:
    """config.json of every export, written one way: the dict as built (our keys, the legacy
    top-level keys the authors' code reads, their multimodal keys), never re-serialised by a
    `transformers` config class, which drops the legacy keys (the authors' Phi class would then
    read its default rotary fraction 0.5 instead of Phi-2's 0.4)."""
    (Path(out) / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")


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


NO_TOKENIZER = ("imported without a tokenizer (--no-tokenizer): training, generation, "
                "evaluation, data preparation and release export will each need --tokenizer")


def check_tokenizer(src: str | os.PathLike, vocab_size: int) -> list[str]:
    """The tokenizer files of an HF folder, proven readable before they are copied: present,
    loaded by `tokenizers`/`transformers` as training will load them (`<image>` and EOS
    added), and no id past the embedding's `vocab_size` rows. Returns the names."""
    from medmoe_mcore.data.tokenizer import Tokenizer

    src = Path(src)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise ConfigError(f"{src}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                          "pass --no-tokenizer to import the weights alone")
    try:
        if (src / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as RawTokenizer

            RawTokenizer.from_file(str(src / "tokenizer.json"))
        tok = Tokenizer(src)
    except Exception as e:  # noqa: BLE001 - any failure of a third-party parser is named
        raise ConfigError(f"{src}: tokenizer files {names} cannot be read "
                          f"({type(e).__name__}: {str(e)[:300]}); fix or remove them and "
                          "pass --no-tokenizer") from None
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {tok.vocab_size} tokens (with <image> and "
                          f"EOS), the embedding {vocab_size} rows (config.json vocab_size): "
                          "ids past the embedding cannot be looked up")
    return names


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
