"""Build the Med-MoE language model from our config (no globals, no argv)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.models.lora.linears import initialize_adapters
from medmoe_mcore.models.moe.expert_params import tag_expert_parameters
from medmoe_mcore.models.specs.backends import Backend, run_backend
from medmoe_mcore.models.specs.language import language_block_spec
from medmoe_mcore.models.transformer_config import language_transformer_config


class LanguageModel(GPTModel):
    """Megatron GPTModel with what Phi-2/StableLM-2 need beyond it.

    - an optional LM-head bias (Phi-2);
    - the embedding/LM head padded to `padded_vocab_size` (TP-independent shapes); the padded
      logits are masked out of the loss so they never take probability mass or gradient.
    """

    def __init__(self, cfg: ModelConfig, backend: Backend | None = None,
                 perform_initialization: bool = True, parallel_output: bool = True,
                 scatter_embedding_sequence_parallel: bool = True):
        cfg.validate()
        lm = cfg.language
        config = language_transformer_config(cfg, perform_initialization=perform_initialization)
        super().__init__(
            config=config,
            transformer_layer_spec=language_block_spec(
                lm, backend or run_backend(cfg.parallel), cfg.moe, cfg.lora),
            vocab_size=lm.padded_vocab_size,
            max_sequence_length=lm.max_position_embeddings,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=lm.rotary_percent,
            rotary_base=lm.rotary_base,
            # False when images are spliced in first (the multimodal model scatters after).
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        )
        self.model_config = cfg
        if lm.output_layer_bias:
            _add_column_parallel_bias(self.output_layer, config)
        tag_expert_parameters(self)
        if cfg.lora is not None and perform_initialization:
            initialize_adapters(self, cfg.lora.init_seed)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        """Megatron's, except that given position_ids (packed samples: positions restart per
        sample) set each token's rotary angle; Megatron's RoPE takes 0..S-1 in every row.
        Under an inference context Megatron's table spans the cache and attention picks the
        step's rows by the context's offset, so the table is left as it is."""
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  **kwargs)
        if position_ids is None or out[1] is None or kwargs.get("inference_context"):
            return out
        table = out[1][:, 0, 0]  # [S, rotary dim]: positions 0..S-1
        return (out[0], table[position_ids.t()].unsqueeze(2), *out[2:])  # [S, b, 1, dim]

    def compute_language_model_loss(self, labels, logits):
        return super().compute_language_model_loss(labels, self.mask_padded_vocab(logits))

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Set logits of padded vocab rows held by this TP rank to -inf."""
        real = self.model_config.language.vocab_size
        local = logits.shape[-1]
        start = local * self.pg_collection.tp.rank() if self.parallel_output else 0
        if start + local <= real:
            return logits
        column = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(column >= real, float("-inf"))


def _add_column_parallel_bias(layer, config) -> None:
    """Give a ColumnParallelLinear built with bias=False a TP-sharded, zero-initialised bias."""
    bias = torch.nn.Parameter(torch.zeros(layer.output_size_per_partition,
                                          dtype=config.params_dtype,
                                          device=layer.weight.device))
    set_tensor_model_parallel_attributes(bias, True, 0, 1)
    bias.allreduce = True
    layer.bias = bias
