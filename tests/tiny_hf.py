"""Tiny random HF reference models of awkward but valid shapes, built from configs."""

import torch

# Odd vocab, 3 layers, small rotary dims, GQA for StableLM; heads divisible by 2 for TP=2.
PHI = dict(vocab_size=1001, hidden_size=60, num_hidden_layers=3, num_attention_heads=6,
           intermediate_size=120, partial_rotary_factor=0.4, max_position_embeddings=128)
PHI_ODD_HEADS = dict(PHI, num_attention_heads=5, partial_rotary_factor=0.2)  # TP=1 only
STABLELM = dict(vocab_size=997, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=100, partial_rotary_factor=0.25,
                use_qkv_bias=True, max_position_embeddings=128)


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
    return folder
