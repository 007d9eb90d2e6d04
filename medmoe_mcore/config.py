"""One config tree for the whole model; validation names the field and the value.

Only `LanguageConfig` and `ParallelConfig` are used by the language models today; the vision,
projector and MoE sub-configs join the tree in their own issues.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A config that cannot work, raised before any compute."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class LanguageConfig:
    """Architecture of the language model (shape-related facts only come from here)."""

    family: Literal["phi", "stablelm"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rotary_percent: float
    rotary_base: float = 10000.0
    layernorm_epsilon: float = 1e-5
    # Block structure: Phi-2 feeds one norm into attention and MLP in parallel.
    parallel_residual: bool = False
    gated_linear_unit: bool = False
    activation: Literal["gelu_tanh", "silu", "gelu", "quick_gelu"] = "gelu_tanh"
    add_bias_linear: bool = True  # MLP and attention output projection
    add_qkv_bias: bool = True
    output_layer_bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Embedding/LM-head rows are padded to a multiple of this (TP-independent checkpoints).
    make_vocab_size_divisible_by: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    def validate(self) -> None:
        p = "language"
        _require(self.family in ("phi", "stablelm"),
                 f"{p}.family={self.family!r}: must be 'phi' or 'stablelm'")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "ffn_hidden_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f"{p}.{name}={value!r}: must be a positive integer")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"{p}.hidden_size={self.hidden_size} is not divisible by "
                 f"{p}.num_attention_heads={self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"{p}.num_attention_heads={self.num_attention_heads} is not divisible by "
                 f"{p}.num_query_groups={self.num_query_groups}")
        _require(0.0 < self.rotary_percent <= 1.0,
                 f"{p}.rotary_percent={self.rotary_percent}: must be in (0, 1]")
        _require(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                 f"{p}.rotary_percent={self.rotary_percent} gives rotary dim {self.rotary_dim} "
                 f"of head dim {self.head_dim}: it must be even and at least 2")
        _require(self.activation in ("gelu_tanh", "silu", "gelu", "quick_gelu"),
                 f"{p}.activation={self.activation!r}: unknown activation")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"{p}.{name}={value}: must be in [0, 1)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def validate(self, language: LanguageConfig) -> None:
        p = "parallel"
        tp = self.tensor_model_parallel_size
        for name in ("tensor_model_parallel_size", "expert_model_parallel_size",
                     "pipeline_model_parallel_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f"{p}.{name}={value!r}: must be a positive integer")
        _require(self.pipeline_model_parallel_size == 1,
                 f"{p}.pipeline_model_parallel_size={self.pipeline_model_parallel_size}: "
                 "pipeline parallelism is not supported yet")
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "padded_vocab_size"):
            value = getattr(language, name)
            _require(value % tp == 0,
                     f"{p}.tensor_model_parallel_size={tp} does not divide "
                     f"language.{name}={value}")
        _require(not self.sequence_parallel or tp > 1,
                 f"{p}.sequence_parallel=True needs tensor_model_parallel_size > 1 (got {tp})")


@dataclass
class ModelConfig:
    language: LanguageConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Activation recompute (a run-time choice, not saved with checkpoints): None or "full".
    recompute_granularity: Optional[Literal["full", "selective"]] = None

    def validate(self) -> "ModelConfig":
        self.language.validate()
        self.parallel.validate(self.language)
        _require(self.recompute_granularity in (None, "full", "selective"),
                 f"recompute_granularity={self.recompute_granularity!r}: must be None, 'full' "
                 "or 'selective'")
        _require(self.params_dtype in ("float32", "bfloat16", "float16"),
                 f"params_dtype={self.params_dtype!r}: must be float32, bfloat16 or float16")
        return self

    # Architecture and storage dtype travel with checkpoints; the parallel layout does not.
    def to_json(self) -> str:
        return json.dumps({"language": dataclasses.asdict(self.language),
                           "params_dtype": self.params_dtype}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, parallel: Optional[ParallelConfig] = None) -> "ModelConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(LanguageConfig)}
        unknown = sorted(set(data["language"]) - known)
        _require(not unknown, f"language config has unknown field(s) {unknown}")
        return cls(language=LanguageConfig(**data["language"]),
                   parallel=parallel or ParallelConfig(),
                   params_dtype=data.get("params_dtype", "float32"))
