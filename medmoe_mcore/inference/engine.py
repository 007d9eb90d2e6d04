"""Batched decoding of the multimodal Med-MoE model (dense or MoE) with Megatron-Core's static
KV cache (`StaticInferenceContext`), at any TP (+SP), EP and DP.

Prompts of different lengths share one batch the way Megatron's static engine does it: the
prefill runs up to the shortest prompt, then one position per step for everyone; a sample
still inside its prompt is fed its own next prompt embedding and ignores the logits. Every
sample thus sees exactly its own unpadded sequence (no attention mask needed).

Sequence parallelism is switched off for decoding with Megatron's own policy
(`set_model_to_sequence_parallel`): off everywhere, except inside MoE layers when TP and EP
are both > 1, where Megatron requires it. The weights are the same either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.static_decode import (GraphedDecodeStep, StaticDecodeStep,
                                                 check_supported)
from medmoe_mcore.models.medmoe import MedMoEModel, splice_images
from medmoe_mcore.models.moe.modality_router import ModalityRouter
from medmoe_mcore.models.specs.backends import announce
from medmoe_mcore.models.transformer_config import DTYPES
from medmoe_mcore.runtime.parallel import device, log


def load_for_inference(load_root, parallel: ParallelConfig, bf16: bool = False):
    """(model in eval mode on this rank's device, its ModelConfig) from any stage's checkpoint,
    at the layout of the process groups the entry point made."""
    folder = store.resolve(load_root)
    cfg: ModelConfig = store.read_config(folder, parallel)
    if bf16:
        cfg.params_dtype = "bfloat16"
    if cfg.vision is None:
        raise ConfigError(f"{folder}: a text-only checkpoint; generation here is for the "
                          "multimodal Med-MoE model")
    if cfg.moe is not None and cfg.moe.routing_granularity == "sample":
        raise ConfigError("moe.routing_granularity='sample' cannot decode with a KV cache: "
                          "the sample's mean hidden state changes with every new token")
    log(announce(cfg.parallel.transformer_impl))
    model = MedMoEModel(cfg, parallel_output=False).to(device())
    store.load_into(model, folder)
    _cast_except_router(model, DTYPES[cfg.params_dtype])
    model.eval()
    if cfg.parallel.sequence_parallel:
        both = cfg.parallel.tensor_model_parallel_size > 1 and \
            cfg.parallel.expert_model_parallel_size > 1
        set_model_to_sequence_parallel(model.language_model, False,
                                       exclude_modules=[BaseMoELayer] if both else None)
    return model, cfg


def load_asked_model(load, hf_dir, parallel: ParallelConfig, gen: GenerationConfig,
                     make_groups):
    """(model, its ModelConfig, tokenizer) for the question-answering tools, from `--load` or
    a release folder `--hf-dir` (converted once, see `checkpoint_of_release`). `make_groups
    (parallel, seed)` is the entry point's own process-group set-up (library code makes none):
    called with TP=1 for the conversion, then with the layout asked for."""
    from medmoe_mcore.data.tokenizer import Tokenizer

    if hf_dir:
        make_groups(ParallelConfig(), gen.seed)
        load = checkpoint_of_release(hf_dir)
    folder = store.resolve(load)
    tok = Tokenizer(gen.tokenizer or folder / store.TOKENIZER)
    make_groups(parallel, gen.seed)
    model, cfg = load_for_inference(folder, parallel, bf16=gen.bf16)
    return model, cfg, tok


def checkpoint_of_release(hf_dir) -> str:
    """A release folder (tools/convert_mcore_to_hf.py) converted once into a temporary
    checkpoint that every rank then loads. Every rank takes part in the collective save, in
    the TP=1 process groups the entry point made; every rank must see $TMPDIR (one node, or a
    shared filesystem)."""
    import tempfile

    from medmoe_mcore.conversion.llava import import_multimodal

    where = [tempfile.mkdtemp(prefix="medmoe-release-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where, src=0)
    import_multimodal(hf_dir, where[0], show_progress=False)
    return where[0]


def _cast_except_router(model, dtype) -> None:
    """Every parameter in the run's dtype (a few modules, such as CLIP's ln_pre, are built in
    float32 whatever params_dtype), except the modality router's: float32 as the authors'."""
    routers = {id(p) for m in model.modules() if isinstance(m, ModalityRouter)
               for p in m.parameters()}
    for param in model.parameters():
        if id(param) not in routers and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _choose(logits: torch.Tensor, gen: GenerationConfig, generators, drawing) -> torch.Tensor:
    """[b, vocab] float32 logits -> [b] next tokens: greedy, or temperature + top-p sampled on
    CPU with each sample's own generator (every rank draws the same token). Only samples in
    `drawing` draw, so a sample's random stream does not depend on its batch."""
    tokens = logits.argmax(dim=-1)
    if gen.temperature == 0 or not any(drawing):
        return tokens
    probs = torch.softmax(logits.float().cpu() / gen.temperature, dim=-1)
    if gen.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= gen.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    for i in (i for i, on in enumerate(drawing) if on):
        tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i]).item()
    return tokens


class KVCacheDecoder:
    """The language model run position by position over Megatron's static KV cache. With
    `static`, one-position steps after the prefill run the static decode step
    (static_decode.py), captured as a CUDA graph on a GPU."""

    def __init__(self, model: MedMoEModel, batch_size: int, max_length: int,
                 static: bool = False):
        if static:
            check_supported(model)  # refused before any compute
        self.model, self.static, self.step = model, static, None
        self.lm = model.language_model
        self.vocab = model.model_config.language.vocab_size
        self.context = StaticInferenceContext(batch_size, max_length)

    @torch.inference_mode()
    def forward(self, decoder_input: torch.Tensor) -> torch.Tensor:
        """[s, b, h] embeddings of the next s positions -> float32 logits [b, vocab] of the
        last one (padded vocab rows are never returned)."""
        offset = self.context.sequence_len_offset
        if self.static and decoder_input.shape[0] == 1 and offset > 0:
            logits = self._static_step(decoder_input.contiguous(), offset)
        else:
            logits = self.lm(input_ids=None, position_ids=None, attention_mask=None,
                             decoder_input=decoder_input.contiguous(),
                             inference_context=self.context, runtime_gather_output=True)
            logits = logits[:, -1, :self.vocab].float()
        self.context.sequence_len_offset += decoder_input.shape[0]
        return logits

    def _static_step(self, decoder_input: torch.Tensor, offset: int) -> torch.Tensor:
        position = torch.tensor([offset], device=decoder_input.device)
        if self.step is None:
            step = StaticDecodeStep(self.model, self.context, self.context.max_sequence_length)
            self.step = GraphedDecodeStep(step, decoder_input, position) \
                if decoder_input.is_cuda else step
        return self.step(decoder_input, position)


@torch.inference_mode()
def generate(model: MedMoEModel, prompts: list[list[int]], images: torch.Tensor | None,
             eos_id: int, gen: GenerationConfig, sample_ids: list[int] | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """New tokens of each prompt (EOS included when reached). `prompts`: token ids with one
    `vision.image_token_id` per image; `images`: [n, 3, H, W] preprocessed, in order of
    appearance; `sample_ids`: each prompt's index in the whole input (sampling seeds).

    Every rank of the model-parallel and expert-parallel groups must call this with the same
    number of forward steps: the loop runs until no rank in the world has a sample left."""
    cfg = model.model_config
    lm, vision = model.language_model, cfg.vision
    dev = next(model.parameters()).device
    b = len(prompts)
    embeds = _embed(model, padded(prompts, pad_id, dev), images)
    lengths = [len(p) + (vision.num_patches - 1) * p.count(vision.image_token_id)
               for p in prompts]
    # A rank whose samples are done keeps stepping while others decode (expert-parallel
    # all-to-alls need everyone): its cache must hold the longest run of any rank.
    steps = _world_max(max(lengths) + gen.max_new_tokens - min(lengths), dev)
    decoder = KVCacheDecoder(model, b, min(lengths) + steps + 1, static=gen.enable_cuda_graph)
    sample_ids = list(range(b)) if sample_ids is None else sample_ids
    generators = [torch.Generator().manual_seed(gen.seed + i) for i in sample_ids]
    position = min(lengths)
    logits = decoder.forward(embeds[:position])
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    while True:
        drawing = [position >= lengths[i] and not done[i] for i in range(b)]
        tokens = _choose(logits, gen, generators, drawing)
        chosen = tokens.tolist()  # one device-to-host copy per step, not one per sample
        for i in range(b):
            if drawing[i]:
                out[i].append(chosen[i])
                done[i] = chosen[i] == eos_id or len(out[i]) == gen.max_new_tokens
        if not _anyone_running(not all(done), dev):
            return out
        in_prompt = torch.tensor([position < n for n in lengths], device=dev)
        fed = tokens.masked_fill(in_prompt, 0).view(b, 1)
        next_input = lm.embedding(input_ids=fed, position_ids=None)  # [1, b, h]
        if position < embeds.shape[0]:
            next_input = torch.where(in_prompt.view(1, b, 1), embeds[position:position + 1],
                                     next_input)
        logits = decoder.forward(next_input)
        position += 1


def padded(prompts: list[list[int]], pad_id: int, dev) -> torch.Tensor:
    """[b, longest] token ids, right-padded."""
    ids = torch.full((len(prompts), max(map(len, prompts))), pad_id, dtype=torch.long,
                     device=dev)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    return ids


def _embed(model: MedMoEModel, ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
    """[S, b, h] embeddings with each placeholder replaced by its image's (no SP scatter)."""
    lm, vision = model.language_model, model.model_config.vision
    text = lm.embedding(input_ids=ids.masked_fill(ids == vision.image_token_id, 0),
                        position_ids=None)
    image_embeds = None if images is None or images.shape[0] == 0 else \
        model.image_features(images.to(ids.device))
    return splice_images(text, ids, image_embeds, vision.image_token_id)[0]


@torch.inference_mode()
def forward_once(model: MedMoEModel, ids: torch.Tensor, images: torch.Tensor | None) -> None:
    """One forward pass over whole sequences without a cache, outputs discarded: for what
    forward hooks observe (models/moe/stats.py). A collective like generate."""
    model.language_model(input_ids=None, position_ids=None, attention_mask=None,
                         decoder_input=_embed(model, ids, images).contiguous())


def _world_max(value: int, dev) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _anyone_running(mine: bool, dev) -> bool:
    """Whether any rank still decodes (expert-parallel all-to-alls need every rank)."""
    return bool(_world_max(int(mine), dev))

