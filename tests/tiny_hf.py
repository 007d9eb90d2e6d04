"""Tiny random HF reference models of awkward but valid shapes, built from configs."""

import torch

# Odd vocab, 3 layers, small rotary dims, GQA for StableLM; heads divisible by 2 for TP=2.
PHI = dict(vocab_size=1001, hidden_size=60, num_hidden_layers=3, num_attention_heads=6,
           intermediate_size=120, partial_rotary_factor=0.4, max_position_embeddings=128)
PHI_ODD_HEADS = dict(PHI, num_attention_heads=5, partial_rotary_factor=0.2)  # TP=1 only
STABLELM = dict(vocab_size=997, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=100, partial_rotary_factor=0.25,
                use_qkv_bias=True, max_position_embeddings=128)


def add_tokenizer(folder, vocab_size: int = 1000):
    """A small byte-level BPE (with <image> and EOS) saved into an HF folder, as real model
    folders carry one; the importer refuses a folder without a readable tokenizer."""
    from medmoe_mcore.data.tokenizer import train_bpe

    words = "the chest x-ray shows no acute findings in the left lung and a normal heart size"
    train_bpe([words, words.upper(), "yes no organ lesion ct mri"], folder, vocab_size)
    return folder


def build(family: str, folder, seed: int = 0, **overrides):
    from transformers import PhiConfig, PhiForCausalLM, StableLmConfig, StableLmForCausalLM

    torch.manual_seed(seed)
    if family == "phi":
        model = PhiForCausalLM(PhiConfig(**{**PHI, **overrides}))
    else:
        model = StableLmForCausalLM(StableLmConfig(**{**STABLELM, **overrides}))
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not HF's init
            p.normal_(0, 0.1)
    model.save_pretrained(str(folder))
    return add_tokenizer(folder)


# CLIP of a valid small shape: 56 px / patch 14 = 16 patches, 3 layers (feature layer -2 runs 2).
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=56, patch_size=14, projection_dim=16, hidden_act="quick_gelu")


def _randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not HF's init
            p.normal_(0, 0.1)


def build_clip(folder, seed: int = 0, **overrides):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**{**CLIP, **overrides}))
    _randomise(model, seed)
    model.save_pretrained(str(folder))
    return folder


def build_llava(family: str, folder, seed: int = 0, **text_overrides):
    """Tiny LlavaForConditionalGeneration; the last vocabulary id is the `<image>` token."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              PhiConfig, StableLmConfig)

    text = {**(PHI if family == "phi" else STABLELM), **text_overrides}
    text_cfg = PhiConfig(**text) if family == "phi" else StableLmConfig(**text)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=text_cfg,
                         image_token_index=text["vocab_size"] - 1,
                         image_seq_length=(CLIP["image_size"] // CLIP["patch_size"]) ** 2)
    model = LlavaForConditionalGeneration(config)
    _randomise(model, seed)
    model.save_pretrained(str(folder))
    return add_tokenizer(folder)
