"""Routers for any expert count: experts' domains (sub-domains by k-means, groups of
modalities), their labels, and the router file's record of them."""

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.router import domains
from medmoe_mcore.router import file as router_file
from medmoe_mcore.router.file import RouterWeights
from medmoe_mcore.router.training import RouterRecipe, evaluate, fit_router


def _blobs():
    """Modalities A (two far-apart blobs), B (one blob), C (one blob near B): 2-D features."""
    gen = torch.Generator().manual_seed(0)
    centres = {"A": [(-10, 0), (-10, 20)], "B": [(10, 0)], "C": [(12, 1)]}
    feats, names = [], []
    for m, cs in centres.items():
        for c in cs:
            feats.append(torch.tensor(c, dtype=torch.float) + 0.3 * torch.randn(12, 2,
                                                                                  generator=gen))
            names += [m] * 12
    return torch.cat(feats), names


def test_one_expert_per_modality_is_the_papers_router():
    feats, names = _blobs()
    plan = domains.plan(feats, names, 3)
    assert plan.experts == ["A", "B", "C"]
    assert plan.by_modality == {"A": [0], "B": [1], "C": [2]}
    assert plan.labels(feats, names).tolist() == [0] * 24 + [1] * 12 + [2] * 12


def test_more_experts_split_modalities_by_their_features():
    feats, names = _blobs()
    plan = domains.plan(feats, names, 4)  # A has the most samples: it gets the extra expert
    assert plan.experts == ["A.1", "A.2", "B", "C"]
    labels = plan.labels(feats, names)
    # each of A's blobs is one sub-domain, whole
    assert len(set(labels[:12].tolist())) == 1 and len(set(labels[12:24].tolist())) == 1
    assert set(labels[:24].tolist()) == {0, 1}
    assert domains.plan(feats, names, 4).labels(feats, names).equal(labels)  # seeded
    plan8 = domains.plan(feats, names, 8)
    assert [len(plan8.by_modality[m]) for m in "ABC"] == [3, 3, 2]


def test_fewer_experts_group_the_closest_modalities():
    feats, names = _blobs()
    plan = domains.plan(feats, names, 2)
    assert plan.experts == ["A", "B+C"]
    assert plan.by_modality == {"A": [0], "B": [1], "C": [1]}


def test_a_modality_with_too_few_samples_for_its_experts_is_named():
    feats, names = _blobs()
    with pytest.raises(ValueError, match="modality 'C' has 2 labelled samples for 3 experts"):
        domains.plan(feats[:38], names[:38], 9)


def test_router_file_keeps_the_domains_and_refuses_bad_ones(tmp_path):
    feats, names = _blobs()
    plan = domains.plan(feats, names, 4)
    labels = plan.labels(feats, names)
    router = fit_router(feats, labels, plan.experts, RouterRecipe(epochs=30))
    assert evaluate(router, feats, labels)["accuracy"] > 0.95
    router = RouterWeights(router.weight, router.bias, router.modalities, plan.by_modality)
    back = router_file.load(router_file.save(router, tmp_path / "r.safetensors"), 2, 4)
    assert back.domains == plan.by_modality and back.modalities == plan.experts
    for bad in ({"A": [0, 1], "B": [2]}, {"A": [0, 1], "B": [2], "C": [4]}, {"A": []}):
        with pytest.raises(ConfigError, match="domains .* covering every expert"):
            router_file.save(RouterWeights(router.weight, router.bias, router.modalities, bad),
                             tmp_path / "bad.safetensors")
