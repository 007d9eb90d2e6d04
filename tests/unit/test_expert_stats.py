"""Expert activation by modality (models/moe/stats.py): what the counts add up to, and the
modality router at sample granularity sending each modality's tokens to its own expert."""

import csv

import pytest
import torch

from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.eval.plots import expert_heatmap
from medmoe_mcore.models.medmoe import MedMoEModel
from medmoe_mcore.models.moe.stats import KINDS, ExpertActivation, moe_layers, shares

IMAGE = 3
MODALITIES = ["CT", "MRI", "X-Ray", "Pathology"]
# four samples, one per modality, of different lengths (right-padded with 0)
PROMPTS = [[5, IMAGE, 7, 9, 11], [IMAGE, 8, 3 + 3, 10, 12, 14, 15, 2], [IMAGE, 20, 21],
           [6, 6, IMAGE, 30, 31, 32]]


def _model(**moe):
    torch.manual_seed(0)
    cfg = ModelConfig(language=medmoe_language("tiny"), vision=vision_flavor("tiny", IMAGE),
                      moe=MoEConfig(**moe))
    model = MedMoEModel(cfg, parallel_output=False).eval()
    for layer in moe_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    return model


def _batch():
    ids = torch.zeros(len(PROMPTS), max(map(len, PROMPTS)), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, :len(p)] = torch.tensor(p)
    images = torch.randn(len(PROMPTS), 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return ids, images


def _count(model, stats):
    ids, images = _batch()
    stats.begin_batch(ids, [len(p) for p in PROMPTS], MODALITIES)
    with torch.no_grad():
        model(ids, images)
    stats.end_batch()
    return stats.reduce()


def test_counts_add_up_to_routed_tokens_times_topk(tmp_path):
    model = _model(num_experts=4, router_topk=2)
    stats = ExpertActivation(model, MODALITIES)
    counts = _count(model, stats)
    patches = model.model_config.vision.num_patches
    seq = max(len(p) + patches - 1 for p in PROMPTS)  # the spliced batch
    assert counts.shape == (len(moe_layers(model)), 4, len(KINDS), 4)
    for layer in counts:
        assert int(layer.sum()) == seq * len(PROMPTS) * 2  # every position, k = 2
        assert int(layer[:, KINDS.index("image")].sum()) == len(PROMPTS) * patches * 2
        assert int(layer[:, KINDS.index("text")].sum()) == sum(len(p) - 1 for p in PROMPTS) * 2
        for m, p in enumerate(PROMPTS):  # each sample's tokens under its own modality
            assert int(layer[m, 1:].sum()) == (len(p) - 1 + patches) * 2
    # outside begin/end nothing is counted (decoding steps go through the same routers)
    with torch.no_grad():
        model(*_batch())
    assert torch.equal(stats.reduce(), counts)
    path = stats.write_csv(counts, tmp_path / "stats.csv")
    rows = list(csv.DictReader(open(path)))
    assert sum(int(r["count"]) for r in rows) == int(counts.sum())
    png = expert_heatmap(counts, stats.layer_numbers, MODALITIES, tmp_path / "heat.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sample_granularity_sends_each_modality_to_its_own_expert():
    """A router that tells the four samples apart by their mean hidden state (fitted layer by
    layer, as a trained modality router would) routes every token of a sample, image or text,
    to that sample's expert; per token, the same router scatters them."""
    model = _model(num_experts=4, router_topk=1, routing_granularity="sample")
    ids, images = _batch()
    for layer in moe_layers(model):
        seen = {}

        def keep(router, inputs, output):
            seen.setdefault("x", inputs[0].float().mean(dim=0))  # [b, h]: what it pools
        hook = layer.router.register_forward_hook(keep)
        with torch.no_grad():
            model(ids, images)
        hook.remove()
        pooled = torch.cat([seen["x"], torch.ones(len(PROMPTS), 1)], dim=1)  # [b, h + 1]
        target = 20 * torch.eye(4)  # logits: sample m -> expert m
        solution = torch.linalg.lstsq(pooled, target).solution  # [h + 1, E]
        layer.router.weight.data = solution[:-1].T.contiguous()
        layer.router.bias.data = solution[-1].contiguous()
    counts = _count(model, ExpertActivation(model, MODALITIES))
    share = shares(counts)  # [layer, modality, expert]
    assert torch.equal(share, torch.eye(4).expand_as(share).double())
    for layer in moe_layers(model):
        layer.router.granularity = "token"
    per_token = shares(_count(model, ExpertActivation(model, MODALITIES)))
    assert not torch.equal(per_token, share)


def test_refuses_a_dense_model():
    cfg = ModelConfig(language=medmoe_language("tiny"), vision=vision_flavor("tiny", IMAGE))
    with pytest.raises(ValueError, match="need an MoE model"):
        ExpertActivation(MedMoEModel(cfg), MODALITIES)
