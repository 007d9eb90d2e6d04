"""Decoding on Megatron-Core (inference/): the KV cache against recomputing the prefix, a
batch of mixed prompt lengths against one prompt at a time, seeded sampling, refusals."""

import dataclasses
import json

import pytest
import torch

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.engine import generate, load_for_inference
from medmoe_mcore.inference.questions import read_questions
from medmoe_mcore.models.medmoe import MedMoEModel

PROMPTS = [[5, 3, 7, 9, 11], [6, 8, 3, 10, 12, 14, 15, 2, 4], [3, 20, 21]]  # 3 = <image>


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request, tmp_path_factory, single_rank):
    moe = MoEConfig(router_topk=2, renormalize=True) if request.param == "moe" else None
    cfg = ModelConfig(language=medmoe_language("tiny"), vision=vision_flavor("tiny", 3),
                      moe=moe)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    store.save(MedMoEModel(cfg).sharded_state_dict(), root, cfg)
    return load_for_inference(root, ParallelConfig())[0]


def _images():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_kv_cache_decoding_equals_recomputing_the_prefix(model):
    images = _images()
    out = generate(model, PROMPTS, images, eos_id=-1, gen=GenerationConfig(max_new_tokens=12))
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids, ref = list(prompt), []
            for _ in range(12):
                logits = model(torch.tensor([ids]), images=images[i:i + 1])
                ref.append(int(logits[0, -1, :1000].argmax()))
                ids.append(ref[-1])
            assert out[i] == ref, i


def test_sampling_is_seeded_per_sample_whatever_the_batch(model):
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    images = _images()
    batch = generate(model, PROMPTS, images, eos_id=-1, gen=gen)
    assert batch == generate(model, PROMPTS, images, eos_id=-1, gen=gen)
    alone = [generate(model, [p], images[i:i + 1], eos_id=-1, gen=gen, sample_ids=[i])[0]
             for i, p in enumerate(PROMPTS)]
    assert alone == batch
    other = generate(model, PROMPTS, images, eos_id=-1, gen=dataclasses.replace(gen, seed=8))
    assert other != batch


def test_stops_at_eos(model):
    images = _images()
    first = generate(model, PROMPTS, images, eos_id=-1, gen=GenerationConfig(max_new_tokens=6))
    eos = first[0][2]
    out = generate(model, PROMPTS, images, eos_id=eos, gen=GenerationConfig(max_new_tokens=6))
    assert out[0] == first[0][:3]


@pytest.mark.parametrize("fields,message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=0.5), "greedy decoding ignores top_p"),
])
def test_generation_config_refusals(fields, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**fields).validate()


def test_question_file_errors_name_the_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "a?", "image": "x.png"}) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"q\.jsonl:2: not JSON"):
        read_questions(bad)
    bad.write_text(json.dumps({"question": "a?", "image": "missing.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"q\.jsonl:1: image .*missing\.png not found"):
        read_questions(bad)
    bad.write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"q\.jsonl:1: needs a 'question'"):
        read_questions(bad)


def test_sample_level_routing_cannot_decode(tmp_path, single_rank):
    cfg = ModelConfig(language=medmoe_language("tiny"), vision=vision_flavor("tiny", 3),
                      moe=MoEConfig(routing_granularity="sample"))
    store.save(MedMoEModel(cfg).sharded_state_dict(), tmp_path / "m", cfg)
    with pytest.raises(ConfigError, match="routing_granularity='sample'"):
        load_for_inference(tmp_path / "m", ParallelConfig())
