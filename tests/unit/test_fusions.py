"""Megatron's fusions without TE or apex: with bias + activation and bias + dropout + add on, a
model gives the unfused model's per-token loss and every gradient within float32 tolerance, for
Phi-2's tanh-GELU with biases and StableLM's SwiGLU, dense and Med-MoE (the lean experts fuse
too); the native fused cross-entropy gives the unfused loss and its gradient rounded to
bfloat16 (what it returns, so it serves bfloat16 models only); flags a model cannot honour are
refused by name."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
from tests.language_step import loss_and_grads

FUSIONS = ("bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion")


def _loss_and_grads(cfg: ModelConfig, state=None):
    """tests/language_step.py's pass, from weights drawn wide enough to route (first call)."""
    if state is None:
        from medmoe_mcore.models.language import LanguageModel

        torch.manual_seed(0)
        init = LanguageModel(cfg)
        with torch.no_grad():
            for name, p in init.named_parameters():
                p.normal_(0, 0.3 if "router" in name else 0.05)
        state = init.state_dict()
    return loss_and_grads(cfg, state)


@pytest.mark.parametrize("flavor", ["tiny", "tiny_stablelm"])
@pytest.mark.parametrize("experts", [0, 4])
def test_fused_model_equals_the_unfused_one(single_rank, flavor, experts):
    lm = dataclasses.replace(language_flavor(flavor), hidden_dropout=0.0)
    moe = MoEConfig(num_experts=experts, router_topk=2) if experts else None
    gated = lm.gated_linear_unit

    def cfg(on: bool) -> ModelConfig:
        flags = {name: on for name in FUSIONS}
        flags["bias_gelu_fusion" if gated else "bias_swiglu_fusion"] = None  # not this model's
        return ModelConfig(language=lm, moe=moe, parallel=ParallelConfig(**flags)).validate()

    plain, loss_plain, grads_plain = _loss_and_grads(cfg(False))
    fused, loss_fused, grads_fused = _loss_and_grads(cfg(True), plain.state_dict())
    c = fused.config
    assert c.bias_activation_fusion and c.bias_dropout_fusion
    assert c.activation_func is F.silu if gated else c.activation_func is F.gelu  # Megatron's
    assert not plain.config.bias_activation_fusion  # names for its fused kernels
    assert torch.allclose(loss_fused, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_fused.keys() == grads_plain.keys() and len(grads_plain) > 5
    assert any(".experts." in n for n in grads_plain) == bool(experts)
    for name, g in grads_plain.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((grads_fused[name] - g).abs().max() / scale).item() < 1e-5, name


def test_fused_cross_entropy_is_the_unfused_one_with_a_bfloat16_gradient(single_rank):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(12, 2, 1024) * 4
    logits[..., 1000:] = float("-inf")  # padded vocabulary rows, as mask_padded_vocab sets
    labels = torch.randint(0, 1000, (12, 2))
    weight = torch.rand(12, 2)
    results = []
    for ce in (lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, labels),
               lambda x: fused_vocab_parallel_cross_entropy(
                   x, labels, parallel_state.get_tensor_model_parallel_group())):
        x = logits.clone().requires_grad_()
        loss = ce(x)
        (loss * weight).sum().backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (fused_loss, fused_grad) = results
    assert torch.allclose(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert fused_grad.dtype == torch.bfloat16 or torch.equal(fused_grad, fused_grad.bfloat16()
                                                             .float())
    assert torch.allclose(fused_grad.float(), grad.bfloat16().float(), rtol=2 ** -7, atol=1e-7)
    assert not torch.allclose(fused_grad.float(), grad, rtol=1e-5, atol=0)  # not float32


def test_fusions_default_off_on_cpu(single_rank):
    from medmoe_mcore.models.transformer_config import language_transformer_config

    cfg = ModelConfig(language=language_flavor("tiny")).validate()
    config = language_transformer_config(cfg)
    assert not (config.bias_activation_fusion or config.bias_dropout_fusion
                or config.cross_entropy_loss_fusion or config.apply_rope_fusion)
    on = ModelConfig(language=language_flavor("tiny"), parallel=ParallelConfig(
        bias_gelu_fusion=True)).validate()
    assert language_transformer_config(on).bias_activation_fusion


@pytest.mark.parametrize("flavor,flags,message", [
    ("tiny", {"bias_swiglu_fusion": True}, "--bias-swiglu-fusion: the fused kernel computes "
     "silu (gated), this model's activation is language.activation='gelu_tanh'"),
    ("tiny_stablelm", {"bias_gelu_fusion": True}, "--bias-gelu-fusion: the fused kernel "
     "computes gelu_tanh, this model's activation is language.activation='silu' (gated)"),
    ("tiny", {"apply_rope_fusion": True}, "--rope-fusion: Megatron's fused RoPE is Transformer "
     "Engine's kernel"),
    ("tiny", {"cross_entropy_loss_fusion": True}, "--cross-entropy-loss-fusion: Megatron's "
     "native fused cross-entropy returns the logits' gradient in bfloat16, this model computes "
     "in float32"),
])
def test_a_fusion_the_model_cannot_use_is_refused_by_flag(flavor, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(language=language_flavor(flavor), parallel=ParallelConfig(**flags)).validate()


def test_fusion_flags_follow_megatron_lm(tmp_path):
    import argparse

    from medmoe_mcore.training.arguments import add_config_arguments, given

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ParallelConfig, "parallelism")
    args = parser.parse_args(["--no-bias-gelu-fusion", "--bias-swiglu-fusion",
                              "--no-bias-dropout-fusion", "--cross-entropy-loss-fusion",
                              "--no-rope-fusion"])
    assert given(args, ParallelConfig) == dict(
        bias_gelu_fusion=False, bias_swiglu_fusion=True, bias_dropout_fusion=False,
        cross_entropy_loss_fusion=True, apply_rope_fusion=False)
