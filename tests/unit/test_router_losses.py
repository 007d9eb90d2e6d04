"""The learned-router baseline's Megatron losses: --moe-router-load-balancing-type (aux_loss,
seq_aux_loss, none) and --moe-z-loss-coeff reach Megatron's TopKRouter and change the router's
gradient (and nothing else of the forward pass); --moe-expert-capacity-factor drops tokens in
its training runs; the fixed modality router refuses them with the reason."""

import dataclasses

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from tests.language_step import loss_and_grads


def _run(moe: MoEConfig, state=None):
    lm = dataclasses.replace(language_flavor("tiny"), hidden_dropout=0.0)
    model, loss, grads = loss_and_grads(ModelConfig(language=lm, moe=moe).validate(), state)
    return model, loss, {n: g.clone() for n, g in grads.items() if "router" in n}


def test_balancing_and_z_loss_reach_the_router(single_rank):
    base = dict(num_experts=4, router_topk=2, router_type="learned", renormalize=True)
    ref, loss, none = _run(MoEConfig(**base, aux_loss_coeff=0.0))
    layer = ref.decoder.layers[0].mlp.router.config
    assert layer.moe_router_load_balancing_type == "none" and not layer.moe_z_loss_coeff
    grads = {"none": none}
    for name, extra in (("aux_loss", dict(aux_loss_coeff=0.01)),
                        ("seq_aux_loss", dict(aux_loss_coeff=0.01,
                                              load_balancing_type="seq_aux_loss")),
                        ("z_loss", dict(aux_loss_coeff=0.0, z_loss_coeff=0.1))):
        model, other_loss, grads[name] = _run(MoEConfig(**base, **extra), ref.state_dict())
        tc = model.decoder.layers[0].mlp.router.config
        if name != "z_loss":
            assert tc.moe_router_load_balancing_type == name
        else:
            assert tc.moe_z_loss_coeff == 0.1
        assert torch.equal(other_loss, loss)  # the losses act through the backward only
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):
        assert any(not torch.equal(grads[name][k], none[k]) for k in none), name
    assert any(not torch.equal(grads["aux_loss"][k], grads["seq_aux_loss"][k]) for k in none)


def test_the_modality_router_refuses_them():
    lm = language_flavor("tiny")
    for extra, flag in ((dict(load_balancing_type="aux_loss"), "--moe-router-load-balancing-type"),
                        (dict(z_loss_coeff=1e-3), "--moe-z-loss-coeff")):
        with pytest.raises(ConfigError, match=f"{flag}: the fixed modality router"):
            ModelConfig(language=lm, moe=MoEConfig(**extra)).validate()
    ModelConfig(language=lm, moe=MoEConfig(load_balancing_type="none")).validate()


def _capacity_run(capacity, state=None):
    from medmoe_mcore.models.language import LanguageModel

    lm = dataclasses.replace(language_flavor("tiny"), hidden_dropout=0.0)
    moe = MoEConfig(num_experts=4, router_topk=2, router_type="learned", renormalize=True,
                    aux_loss_coeff=0.0)
    model = LanguageModel(ModelConfig(language=lm, moe=moe, moe_capacity=capacity).validate())
    if state is not None:
        model.load_state_dict(state)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).unsqueeze(0).expand(2, -1)
    return model, model(tokens, positions, None, labels=tokens).detach()


def test_expert_capacity_drops_tokens_in_the_learned_router_only(single_rank):
    """A capacity every expert stays under changes nothing; a tight one drops tokens, by
    probability or by position; padding to capacity adds only zero rows."""
    ref, loss = _capacity_run(None)
    state = ref.state_dict()
    _, roomy = _capacity_run((4.0, "probs", False), state)
    _, probs = _capacity_run((0.5, "probs", False), state)
    _, position = _capacity_run((0.5, "position", False), state)
    _, padded = _capacity_run((0.5, "probs", True), state)
    assert torch.equal(roomy, loss)
    assert not torch.equal(probs, loss) and not torch.equal(position, probs)
    assert torch.allclose(padded, probs, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="--moe-expert-capacity-factor: only the learned"):
        ModelConfig(language=language_flavor("tiny"), moe=MoEConfig(),
                    moe_capacity=(1.0, "probs", False)).validate()
