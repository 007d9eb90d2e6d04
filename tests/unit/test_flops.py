"""The closed-form model FLOPs (models/flops.py) behind --log-throughput: a multimodal Med-MoE
forward pass, dense and with experts (top-1 and top-2, with the meta expert), counted by
torch's FLOP counter equals the closed form exactly (the counter has no formula for SDPA on
CPU, so the attention core is added in closed form, as bench_step does; the experts' row
padding is turned off); a step is 3x the
language model and projector and 1x the frozen vision tower; the spliced length follows
splice_images."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medmoe_mcore.config.flavors import language_flavor, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.conventions import IMAGE_SENTINEL_ID
from medmoe_mcore.models import flops
from medmoe_mcore.models.medmoe import MedMoEModel


def _cfg(experts: int, topk: int = 1) -> ModelConfig:
    moe = MoEConfig(num_experts=experts, router_topk=topk) if experts else None
    return ModelConfig(language=language_flavor("tiny"),
                       vision=vision_flavor("tiny", IMAGE_SENTINEL_ID), moe=moe).validate()


def _batch(cfg):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 9), generator=gen)
    ids[0, 1] = ids[1, 4] = ids[1, 6] = IMAGE_SENTINEL_ID  # 1 and 2 images: uneven lengths
    v = cfg.vision
    images = torch.randn(3, 3, v.image_size, v.image_size, generator=gen)
    return ids, images


@pytest.mark.parametrize("experts,topk", [(0, 1), (4, 1), (4, 2)])
def test_forward_flops_equal_torch_counter(single_rank, monkeypatch, experts, topk):
    from medmoe_mcore.models.moe import expert_linear

    # the experts' zero-row padding of short blocks (at most 7 rows) is the kernel's, not the
    # model's: model FLOPs count the tokens
    monkeypatch.setattr(expert_linear, "WEIGHT_LEFT_ROW_MULTIPLE", 1)
    cfg = _cfg(experts, topk)
    torch.manual_seed(0)
    model = MedMoEModel(cfg, parallel_output=False).eval()
    ids, images = _batch(cfg)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = model(ids, images)
    v, lm = cfg.vision, cfg.language
    length = flops.spliced_length(ids, v.image_token_id, v.num_patches)
    assert logits.shape[1] == length
    # SDPA has no formula on CPU: QK^T and AV, 4 s^2 h per layer, language and vision
    core = 4 * 2 * length ** 2 * lm.num_attention_heads * lm.head_dim * lm.num_layers + \
        4 * 3 * (v.num_patches + 1) ** 2 * v.hidden_size * v.num_layers
    counted = counter.get_total_flops()
    assert counted > 0
    assert counted + core == flops.forward_flops(cfg, 2, length, 3)


def test_training_flops_count_the_backward_of_what_trains(single_rank):
    cfg = _cfg(4, 2)
    forward = flops.forward_flops(cfg, 2, 700, 3)
    vision = forward - flops.forward_flops(ModelConfig(language=cfg.language, moe=cfg.moe),
                                           2, 700, 0)
    step = flops.training_flops(cfg, 2, 700, 3)
    assert vision > 0 and step < 3 * forward
    # the frozen vision tower: forward only; everything else 3x
    projector = 2 * 3 * cfg.vision.num_patches * (
        cfg.vision.hidden_size * cfg.language.hidden_size + cfg.language.hidden_size ** 2)
    assert step == 3 * forward - 2 * (vision - projector)


def test_spliced_length_pads_to_the_longest_sample_and_the_multiple():
    ids = torch.tensor([[5, -200, 6, 0], [-200, -200, 7, 8]])
    assert flops.spliced_length(ids, -200, 10) == 4 + 2 * 9
    assert flops.spliced_length(ids, -200, 10, pad_to_multiple=4) == 24
    assert flops.spliced_length(torch.tensor([[1, 2, 3]]), -200, 10) == 3
