"""Packed sequences: a row holding several samples (each attending to itself only, its
positions from 0) gives the loss and every gradient of the same samples in rows of their own,
dense and Med-MoE, with text-only and two-image samples among them."""

import dataclasses

import pytest
import torch

from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.conventions import IGNORE_INDEX, IMAGE_SENTINEL_ID
from medmoe_mcore.models.medmoe import MedMoEModel, MultimodalInputError, packed_layout


def samples(gen):
    """(ids, number of images) of four samples: one image, text only, two images, one."""
    out = []
    for length, slots in ((6, [1]), (9, []), (7, [1, 2]), (5, [2])):
        ids = torch.randint(3, 500, (length,), generator=gen)
        ids[slots] = IMAGE_SENTINEL_ID
        out.append(ids)
    return out


def rows(groups, pad=0):
    """Samples grouped into rows: (ids, labels, sample_index) padded to the longest row; each
    sample's first label is IGNORE_INDEX (no token predicts it)."""
    lengths = [sum(len(x) for x in g) for g in groups]
    ids = torch.full((len(groups), max(lengths)), pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    index = torch.full_like(ids, len(max(groups, key=len)))
    for r, group in enumerate(groups):
        at = 0
        for i, x in enumerate(group):
            ids[r, at:at + len(x)] = x
            labels[r, at + 1:at + len(x)] = x[1:]
            index[r, at:at + len(x)] = i
            at += len(x)
    return ids, labels, index


def loss_and_grads(model, ids, images, labels, sample_index=None):
    model.zero_grad()
    per_token, mask = model(ids, images, labels=labels, sample_index=sample_index)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def tiny_model(experts, granularity="token", parallel=None):
    lm = dataclasses.replace(medmoe_language("tiny"), hidden_dropout=0.0)
    moe = MoEConfig(num_experts=experts, routing_granularity=granularity) if experts else None
    cfg = ModelConfig(language=lm, vision=vision_flavor("tiny", IMAGE_SENTINEL_ID),
                      moe=moe, **({"parallel": parallel} if parallel else {})).validate()
    torch.manual_seed(0)
    model = MedMoEModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)  # every expert gets tokens
    return model, cfg


@pytest.mark.parametrize("experts", [0, 4])
def test_packed_rows_equal_the_samples_unpacked(single_rank, experts):
    compare_packed_with_unpacked(*tiny_model(experts))


def compare_packed_with_unpacked(model, cfg, reduce_grads=lambda grads: grads):
    """The four samples in rows of their own, then packed 3 + 1: loss and every gradient
    (`reduce_grads` sums what sequence-parallel ranks hold in part) within 1e-5
    relative."""
    gen = torch.Generator().manual_seed(0)
    xs = samples(gen)
    v = cfg.vision
    images = torch.randn(4, 3, v.image_size, v.image_size, generator=gen)
    ids, labels, _ = rows([[x] for x in xs])
    alone, alone_grads = loss_and_grads(model, ids, images, labels)
    ids, labels, index = rows([[xs[0], xs[1], xs[2]], [xs[3]]])
    packed, packed_grads = loss_and_grads(model, ids, images, labels, index)
    alone_grads, packed_grads = reduce_grads(alone_grads), reduce_grads(packed_grads)
    assert torch.allclose(packed, alone, rtol=1e-5, atol=0)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 10
    for name, grad in alone_grads.items():
        # Relative to the tensor's largest entry: summation order moves a small entry by
        # float32 rounding of the large ones, which an element-wise rtol would flag.
        error = (packed_grads[name] - grad).abs().max().item()
        assert error <= 1e-5 * grad.abs().max().item() + 1e-9, (name, error)


def test_unmasked_packing_would_differ(single_rank):
    """The check above can fail: the same packed rows without the sample mask and positions
    (plain causal attention over the row) give another loss."""
    model, cfg = tiny_model(0)
    gen = torch.Generator().manual_seed(0)
    xs = samples(gen)
    v = cfg.vision
    images = torch.randn(4, 3, v.image_size, v.image_size, generator=gen)
    ids, labels, index = rows([[xs[0], xs[1], xs[2]], [xs[3]]])
    packed, _ = loss_and_grads(model, ids, images, labels, index)
    plain, _ = loss_and_grads(model, ids, images, labels)
    assert not torch.allclose(packed, plain, rtol=1e-4)


def test_packed_layout_restarts_positions_and_confines_attention():
    ids = torch.tensor([[5, IMAGE_SENTINEL_ID, 6, 7, 8, 0]])
    index = torch.tensor([[0, 0, 0, 1, 1, 2]])  # two samples and a padding token
    positions, mask = packed_layout(index, ids, IMAGE_SENTINEL_ID, image_len=3,
                                    pad_to_multiple=5)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 0, 1]]
    allowed = ~mask[0, 0]
    assert allowed[4, :5].all() and not allowed[4, 5:].any()  # sample 0 sees itself only
    assert allowed[6, 5:7].all() and not allowed[6, :5].any() and not allowed[5, 6]


def test_sample_level_routing_refuses_packed_rows(single_rank):
    model, cfg = tiny_model(4, granularity="sample")
    ids, labels, index = rows([[torch.tensor([5, 6, 7]), torch.tensor([8, 9])]])
    with pytest.raises(MultimodalInputError, match="routing_granularity='token'"):
        model(ids, None, labels=labels, sample_index=index)



def test_position_ids_leave_cached_decoding_alone(single_rank):
    """Under an inference context Megatron's rotary table spans the cache; given position_ids
    (as Megatron's own inference engine passes them) must not replace it: a prefill and a
    decoding step give the logits they give without position_ids."""
    from megatron.core.inference.contexts import StaticInferenceContext

    model, _ = tiny_model(0)
    lm = model.language_model.eval()
    ids = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(0))

    def prefill_then_step(with_positions):
        context = StaticInferenceContext(2, 16)
        logits = []
        for start, end in ((0, 5), (5, 6)):
            positions = torch.arange(start, end).expand(2, -1) if with_positions else None
            with torch.no_grad():
                logits.append(lm(input_ids=ids[:, start:end], position_ids=positions,
                                 attention_mask=None, inference_context=context,
                                 runtime_gather_output=True))
            context.sequence_len_offset += end - start
        return logits

    for given, plain in zip(prefill_then_step(True), prefill_then_step(False)):
        assert torch.equal(given, plain)
