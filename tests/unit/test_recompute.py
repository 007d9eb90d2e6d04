"""Megatron-LM's recompute flags: full recompute by uniform chunks or the first N layers
(block), and selective (`--recompute-activations`), reach Megatron's TransformerConfig and
leave the loss and every gradient exactly as without recompute; contradictory flags are
refused by name."""

import dataclasses

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.training.config import TrainConfig
from tests.language_step import loss_and_grads


@pytest.mark.parametrize("granularity,method,layers", [
    ("full", None, None), ("full", "uniform", 2), ("full", "block", 3), ("selective", None, None)])
def test_recompute_changes_no_number(single_rank, granularity, method, layers):
    lm = dataclasses.replace(language_flavor("tiny"), hidden_dropout=0.0)
    base = ModelConfig(language=lm).validate()
    ref, ref_loss, ref_grads = loss_and_grads(base)
    cfg = dataclasses.replace(base, recompute_granularity=granularity, recompute_method=method,
                              recompute_num_layers=layers).validate()
    model, loss, grads = loss_and_grads(cfg, ref.state_dict())
    tc = model.decoder.config
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        granularity, (method or "uniform") if granularity == "full" else None,
        (layers or 1) if granularity == "full" else None)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def test_contradictions_are_refused():
    lm = language_flavor("tiny")
    with pytest.raises(ConfigError, match="only with --recompute-granularity full"):
        ModelConfig(language=lm, recompute_granularity="selective",
                    recompute_method="block").validate()
    with pytest.raises(ConfigError, match="--recompute-num-layers 9: must be between 1 and"):
        ModelConfig(language=lm, recompute_granularity="full",
                    recompute_num_layers=9).validate()
    train = TrainConfig(stage=2, data_path=["d"], train_iters=1, lr=1e-3, load="x",
                        recompute_activations=True, recompute_granularity="full")
    with pytest.raises(ConfigError, match="--recompute-activations .* choose one"):
        train.validate(1)
