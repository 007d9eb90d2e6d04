"""The static decode step (`--enable-cuda-graph`; inference/static_decode.py) on CPU, where it
runs eagerly: the same logits as Megatron's static inference path at every step (Phi- and
StableLM-shaped, dense and Med-MoE at top-1 and top-2, a batch of mixed prompt lengths), the
same greedy tokens through generate, and refusals naming the flag. The CUDA graph around it
is a GPU item (tools/bench_hf_decode.py --enable-cuda-graph)."""

import dataclasses

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.engine import KVCacheDecoder, _embed, generate, padded

PROMPTS = [[5, 3, 7, 9, 11], [6, 8, 3, 10, 12, 14, 15, 2, 4], [3, 20, 21]]  # 3 = <image>


def _model(flavor: str, topk: int):
    from medmoe_mcore.models.medmoe import MedMoEModel

    moe = MoEConfig(router_topk=topk, renormalize=topk == 2) if topk else None
    cfg = ModelConfig(language=medmoe_language(flavor), vision=vision_flavor(flavor, 3),
                      moe=moe).validate()
    torch.manual_seed(0)
    model = MedMoEModel(cfg, parallel_output=False).eval()
    with torch.no_grad():  # a router that spreads tokens over the experts
        for name, p in model.named_parameters():
            if ".router." in name:
                p.normal_(0, 1.0)
    return model


def _images():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flavor,topk", [("tiny", 0), ("tiny", 2), ("tiny_stablelm", 0),
                                         ("tiny_stablelm", 1)])
def test_static_step_gives_megatrons_logits_and_tokens(single_rank, flavor, topk):
    model = _model(flavor, topk)
    with torch.inference_mode():
        embeds = _embed(model, padded(PROMPTS, 0, torch.device("cpu")), _images())
        plain, static = (KVCacheDecoder(model, 3, embeds.shape[0] + 8, static=s)
                         for s in (False, True))
        for decoder in (plain, static):
            decoder.forward(embeds[:3])  # the prefill: Megatron's path for both
        for keys, values in static.context.key_value_memory_dict.values():
            keys[3:], values[3:] = float("nan"), float("nan")  # what uninitialised memory holds
        for position in range(3, embeds.shape[0] + 6):
            step = embeds[position:position + 1] if position < embeds.shape[0] else \
                torch.randn(1, 3, embeds.shape[-1], generator=torch.Generator().manual_seed(
                    position)) * 0.1
            a, b = plain.forward(step), static.forward(step)
            assert static.step is not None
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), position
    gen = GenerationConfig(max_new_tokens=10)
    tokens = generate(model, PROMPTS, _images(), eos_id=-1, gen=gen)
    assert generate(model, PROMPTS, _images(), eos_id=-1,
                    gen=dataclasses.replace(gen, enable_cuda_graph=True)) == tokens


def test_the_static_step_is_refused_where_it_does_not_apply(single_rank):
    model = _model("tiny", 0)
    model.model_config = dataclasses.replace(model.model_config, lora=LoRAConfig(rank=4))
    with pytest.raises(ConfigError, match="--enable-cuda-graph: a checkpoint with LoRA"):
        KVCacheDecoder(model, 1, 8, static=True)
    model.model_config = dataclasses.replace(
        model.model_config, lora=None,
        parallel=dataclasses.replace(model.model_config.parallel, expert_model_parallel_size=2))
    with pytest.raises(ConfigError, match=r"--enable-cuda-graph: the static decode step runs "
                                          r"at TP = EP = 1"):
        KVCacheDecoder(model, 1, 8, static=True)
