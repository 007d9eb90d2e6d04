"""The static decode step captured as a CUDA graph (`--enable-cuda-graph`) against Megatron's
static inference path on a GPU, float32: the same greedy tokens, dense and Med-MoE, a batch of
mixed prompt lengths. Skipped without CUDA."""

import dataclasses

import pytest
import torch

from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.engine import generate
from tests.unit.test_static_decode import PROMPTS, _images, _model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("flavor,topk", [("tiny", 0), ("tiny", 2), ("tiny_stablelm", 1)])
def test_graphed_decoding_gives_the_same_tokens(single_rank, flavor, topk):
    model = _model(flavor, topk).cuda()
    gen = GenerationConfig(max_new_tokens=16)
    images = _images().cuda()
    tokens = generate(model, PROMPTS, images, eos_id=-1, gen=gen)
    graphed = generate(model, PROMPTS, images, eos_id=-1,
                       gen=dataclasses.replace(gen, enable_cuda_graph=True))
    assert graphed == tokens
