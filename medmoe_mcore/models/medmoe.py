"""The Med-MoE vision-language model: CLIP tower -> `mlp2x_gelu` projector -> image features
spliced at each `<image>` placeholder -> Phi-2 / StableLM-2 (dense or Med-MoE).

Composed from Megatron-Core's `CLIPViTModel`, `MultimodalProjector` and our `LanguageModel`
rather than `LLaVAModel`: that class asserts Transformer Engine attention whenever the language
model uses sequence parallelism (our CPU runtime has no TE) and builds its language model
itself from ~50 constructor arguments, while Med-MoE needs our LanguageModel (vocab padding
mask, LM-head bias, MoE specs) and one placeholder token per image.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conventions import IGNORE_INDEX
from medmoe_mcore.models.language import LanguageModel
from medmoe_mcore.models.specs.backends import Backend, run_backend
from medmoe_mcore.models.specs.vision import projector_spec, vision_layer_spec
from medmoe_mcore.models.transformer_config import (projector_transformer_config,
                                                    vision_transformer_config)


class MultimodalInputError(ValueError):
    """A batch the model cannot take (placeholder/image mismatch, wrong image shape)."""


def splice_images(text_embeds: torch.Tensor, input_ids: torch.Tensor,
                  image_embeds: torch.Tensor | None, image_token_id: int,
                  labels: torch.Tensor | None = None, pad_to_multiple: int = 1):
    """Replace each placeholder token by its image's embeddings.

    text_embeds [s, b, h]; input_ids and labels [b, s]; image_embeds [n, p, h], images taken in
    order of appearance (sample by sample). Returns (embeds [S, b, h], labels [b, S] or None),
    right-padded with zeros / IGNORE_INDEX to the longest sample, rounded up to
    `pad_to_multiple` (sequence parallelism splits S over TP ranks). Image positions carry no
    loss. Padding on the right is invisible to real tokens under the causal mask.
    """
    is_image = input_ids == image_token_id
    n_slots, n_images = int(is_image.sum()), 0 if image_embeds is None else image_embeds.shape[0]
    if n_slots != n_images:
        per_sample = is_image.sum(dim=1).tolist()
        raise MultimodalInputError(f"the batch has {n_slots} <image> placeholders (per sample "
                                   f"{per_sample}) but {n_images} images")
    image_len = image_embeds.shape[1] if n_images else 0
    samples, sample_labels, image_index = [], [], 0
    for b in range(input_ids.shape[0]):
        slots = is_image[b].nonzero().flatten().tolist()
        pieces, label_pieces, start = [], [], 0
        for slot in slots:
            pieces += [text_embeds[start:slot, b], image_embeds[image_index]]
            if labels is not None:
                label_pieces += [labels[b, start:slot],
                                 labels.new_full((image_len,), IGNORE_INDEX)]
            image_index += 1
            start = slot + 1
        pieces.append(text_embeds[start:, b])
        samples.append(torch.cat(pieces))
        if labels is not None:
            label_pieces.append(labels[b, start:])
            sample_labels.append(torch.cat(label_pieces))
    length = max(x.shape[0] for x in samples)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    embeds = text_embeds.new_zeros((length, len(samples), text_embeds.shape[-1]))
    out_labels = None if labels is None else labels.new_full((len(samples), length),
                                                             IGNORE_INDEX)
    for b, x in enumerate(samples):
        embeds[: x.shape[0], b] = x
        if labels is not None:
            out_labels[b, : x.shape[0]] = sample_labels[b]
    return embeds, out_labels


TEXT, IMAGE = 1, 2  # token_kinds' values; 0 is padding


def _splice_values(values: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                   image_len: int, pad_to_multiple: int, image_value=None) -> torch.Tensor:
    """[b, s] per-token values -> [S, b] over the spliced sequence, by splice_images' own
    layout applied to a one-channel stand-in for the embeddings: an image's tokens take
    `image_value`, or else the value of its placeholder; the splice's right padding is 0."""
    is_image = input_ids == image_token_id
    n_images = int(is_image.sum())
    images = None
    if n_images:
        at_slots = values[is_image].float() if image_value is None else \
            torch.full((n_images,), float(image_value), device=values.device)
        images = at_slots.view(n_images, 1, 1).expand(n_images, image_len, 1)
    spliced, _ = splice_images(values.t().float().unsqueeze(-1), input_ids, images,
                               image_token_id, pad_to_multiple=pad_to_multiple)
    return spliced[..., 0].long()


def token_kinds(input_ids: torch.Tensor, lengths, image_token_id: int, image_len: int,
                pad_to_multiple: int = 1) -> torch.Tensor:
    """[S, b] long over the spliced sequence: TEXT, IMAGE, or 0 for padding (positions past a
    sample's `lengths[b]` ids, and the splice's own right padding)."""
    ids = input_ids.cpu()
    real = torch.arange(ids.shape[1]).unsqueeze(0) < torch.as_tensor(list(lengths)).unsqueeze(1)
    return _splice_values(real.long() * TEXT, ids, image_token_id, image_len, pad_to_multiple,
                          image_value=IMAGE)


def packed_layout(sample_index: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                  image_len: int, pad_to_multiple: int = 1):
    """Rows that each hold several samples (`sample_index` [b, s]: which sample of its row a
    token belongs to, its images included) -> (position_ids [b, S]: each sample's positions
    from 0; attention_mask [b, 1, S, S], Megatron's True = masked: causal within a sample,
    nothing across samples). The splice's right padding is a segment of its own."""
    segment = _splice_values(sample_index + 1, input_ids, image_token_id, image_len,
                             pad_to_multiple).t()  # [b, S]
    b, length = segment.shape
    index = torch.arange(length, device=segment.device).expand(b, length)
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    allowed = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal
    return positions, ~allowed.unsqueeze(1)


class MedMoEModel(MegatronModule):
    """Children: `vision` (frozen CLIP tower, layers up to the feature layer), `projector`,
    `language_model` (our LanguageModel). Checkpoint keys carry these prefixes."""

    def __init__(self, cfg: ModelConfig, backend: Backend | None = None,
                 perform_initialization: bool = True, parallel_output: bool = True):
        cfg.validate()
        if cfg.vision is None:
            raise ConfigError("vision: the multimodal model needs a vision config")
        backend = backend or run_backend(cfg.parallel)
        language = LanguageModel(cfg, backend, perform_initialization, parallel_output,
                                 scatter_embedding_sequence_parallel=False)
        super().__init__(config=language.config)
        self.model_config = cfg
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        v = cfg.vision
        self.vision = CLIPViTModel(
            vision_transformer_config(cfg, perform_initialization), vision_layer_spec(backend),
            ln_pre_impl=backend.norm, add_class_token=True, class_token_len=1,
            patch_dim=v.patch_size, img_h=v.image_size, img_w=v.image_size,
            model_subtype="clip")
        self.projector = MultimodalProjector(
            projector_transformer_config(cfg, perform_initialization), projector_spec(backend),
            projector_type="mlp", input_size=v.hidden_size)
        self.language_model = language

    def set_input_tensor(self, input_tensor) -> None:  # Megatron's schedules call this
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, patches, language hidden]: feature layer, CLS dropped, projected."""
        v = self.model_config.vision
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, v.image_size, v.image_size):
            raise MultimodalInputError(f"images: shape {tuple(images.shape)}, expected "
                                       f"[n, 3, {v.image_size}, {v.image_size}]")
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.vision(images.to(self.vision.conv1.weight.dtype))[:, 1:]
        return self.projector(features.contiguous())

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, sample_index: torch.Tensor | None = None):
        """input_ids [b, s] with one `vision.image_token_id` per image; images [n, 3, H, W]
        (preprocessed, in order of appearance); labels [b, s] unshifted, IGNORE_INDEX where no
        loss (HF convention; shifted here). sample_index [b, s]: rows of packed samples (each
        sample attends to itself only, its positions start at 0; see packed_layout); a
        sample's first label must be IGNORE_INDEX, as no token predicts it.

        Returns logits [b, S, vocab (/TP with parallel_output)] without labels, else
        (per-token loss [b, S], loss mask [b, S]) over the spliced sequence."""
        lm, par = self.language_model, self.model_config.parallel
        image_token_id = self.model_config.vision.image_token_id
        # A sentinel placeholder (< 0) is not in the vocabulary: embed any token, then replace.
        ids = input_ids.masked_fill(input_ids == image_token_id, 0) if image_token_id < 0 \
            else input_ids
        text = lm.embedding(input_ids=ids, position_ids=None)  # [s, b, h], not scattered
        image_embeds = None if images is None or images.shape[0] == 0 else \
            self.image_features(images)
        multiple = par.tensor_model_parallel_size if par.sequence_parallel else 1
        embeds, labels = splice_images(text, input_ids, image_embeds, image_token_id, labels,
                                       pad_to_multiple=multiple)
        positions = mask = None
        if sample_index is not None:
            moe = self.model_config.moe
            if moe is not None and moe.routing_granularity == "sample":
                raise MultimodalInputError(
                    "packed samples need moe.routing_granularity='token': the 'sample' router "
                    "pools over the whole row, which would mix the packed samples")
            positions, mask = packed_layout(sample_index, input_ids, image_token_id,
                                            self.model_config.vision.num_patches, multiple)
        if par.sequence_parallel:
            embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds)
        if labels is None:
            return lm(input_ids=None, position_ids=positions, attention_mask=mask,
                      decoder_input=embeds)
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1),
                                                            IGNORE_INDEX)], dim=1)
        loss_mask = shifted != IGNORE_INDEX
        loss = lm(input_ids=None, position_ids=positions, attention_mask=mask,
                  decoder_input=embeds, labels=shifted.clamp(min=0))
        return loss, loss_mask


def build_model(cfg: ModelConfig, **kwargs):
    """The model a config describes: multimodal with a vision config, else text-only."""
    return (MedMoEModel if cfg.vision is not None else LanguageModel)(cfg, **kwargs)
