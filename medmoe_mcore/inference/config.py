"""What one generation run is asked to do: `GenerationConfig`. Every field is also a flag of
tools/generate.py (training/arguments.py builds them from this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medmoe_mcore.config.fields import ConfigError, option
from medmoe_mcore.conventions import DEFAULT_SEED
from medmoe_mcore.data.encoding import TEMPLATES


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(64, "stop a sample after this many new tokens (or at EOS)")
    temperature: float = option(0.0, "0: greedy decoding; > 0: sample from softmax(logits / "
                                "temperature)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens whose "
                          "probability reaches top_p (with temperature > 0)")
    seed: int = option(DEFAULT_SEED, "sampling seed; sample i of the input always draws from "
                       "seed + i, whatever the batch or layout")
    micro_batch_size: int = option(8, "prompts decoded together on each data-parallel rank")
    template: str = option("phi", "prompt template of the questions (the model's stage-2/3 "
                           "conversation format)", choices=TEMPLATES[1:])
    tokenizer: Optional[str] = option(None, "HF tokenizer folder or sentencepiece .model "
                                      "(default: the checkpoint's tokenizer/)")
    bf16: bool = option(False, "run in bfloat16 (parameters and activations)")
    enable_cuda_graph: bool = option(
        False, "decode through the static step (fixed shapes, no host synchronisation), "
        "captured once as a CUDA graph and replayed per token on a GPU (eagerly on CPU); the "
        "same tokens; TP = EP = 1, no LoRA adapters (docs/generation.md)")

    def validate(self) -> "GenerationConfig":
        for name in ("max_new_tokens", "micro_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_p < 1 and self.temperature == 0:
            raise ConfigError(f"top_p={self.top_p} with temperature=0: greedy decoding ignores "
                              "top_p; set --temperature > 0 to sample")
        return self
