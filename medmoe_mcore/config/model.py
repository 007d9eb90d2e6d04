"""One config tree for the whole model; validation names the field and the value.

`LanguageConfig` (backbone shape), `VisionConfig` (CLIP tower, projector and image facts; None
for a text-only model), `MoEConfig` (stage-3 Mixture of Experts, None for a dense model) and
`ParallelConfig` (layout, never saved with checkpoints). Fields made with `option` are also
command-line flags: training/arguments.py builds each flag (Megatron-LM's spelling where one
exists), its type, default, choices and help from the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from medmoe_mcore.config.fields import option, require, require_divisible, require_positive_ints
from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.parallel import (  # noqa: F401 - the tree's names, one import
    TRANSFORMER_IMPLS, ParallelConfig, transformer_engine_importable)
from medmoe_mcore.conventions import IGNORE_INDEX, IMAGE_SENTINEL_ID

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
        require(self.family in ("phi", "stablelm"),
                f"{p}.family={self.family!r}: must be 'phi' or 'stablelm'")
        require_positive_ints(self, p, ("vocab_size", "hidden_size", "num_layers",
                                        "num_attention_heads", "num_query_groups",
                                        "ffn_hidden_size", "max_position_embeddings",
                                        "make_vocab_size_divisible_by"))
        require_divisible(self, p, "hidden_size", "num_attention_heads")
        require_divisible(self, p, "num_attention_heads", "num_query_groups")
        require(0.0 < self.rotary_percent <= 1.0,
                f"{p}.rotary_percent={self.rotary_percent}: must be in (0, 1]")
        require(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                f"{p}.rotary_percent={self.rotary_percent} gives rotary dim {self.rotary_dim} "
                f"of head dim {self.head_dim}: it must be even and at least 2")
        require(self.activation in ("gelu_tanh", "silu", "gelu", "quick_gelu"),
                f"{p}.activation={self.activation!r}: unknown activation")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{p}.{name}={value}: must be in [0, 1)")


# CLIP's image processor statistics (OpenAI CLIP, all ViT sizes).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """CLIP vision tower (pre-LN ViT) + `mlp2x_gelu` projector + how images enter the prompt.

    `num_layers` is the number of layers that run: the feature layer is the output of the last
    one (CLIP ViT-L/14 has 24, Med-MoE takes layer -2, so 23 are built).
    """

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    image_size: int = 336
    patch_size: int = 14
    layernorm_epsilon: float = 1e-5
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Layers of the source CLIP (export writes this many; those past num_layers are kept aside).
    source_num_layers: Optional[int] = None
    projector_activation: Literal["gelu"] = "gelu"  # mlp2x_gelu: exact GELU
    # The `<image>` placeholder: a vocabulary token (HF LLaVA) or, like the authors' LLaVA code,
    # a negative sentinel id outside the vocabulary (IMAGE_TOKEN_INDEX = -200).
    image_token_id: int = IMAGE_SENTINEL_ID
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @property
    def num_query_groups(self) -> int:  # plain multi-head attention (shared by QKV mappings)
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, language: LanguageConfig) -> None:
        p = "vision"
        require_positive_ints(self, p, ("hidden_size", "num_layers", "num_attention_heads",
                                        "ffn_hidden_size", "image_size", "patch_size"))
        require_divisible(self, p, "hidden_size", "num_attention_heads")
        require_divisible(self, p, "image_size", "patch_size")
        require(self.source_num_layers is None or self.source_num_layers >= self.num_layers,
                f"{p}.source_num_layers={self.source_num_layers} < num_layers={self.num_layers}")
        require(self.image_token_id < language.vocab_size and self.image_token_id != IGNORE_INDEX,
                f"{p}.image_token_id={self.image_token_id}: must be a token of the vocabulary "
                f"(< language.vocab_size={language.vocab_size}) or a negative sentinel other "
                f"than {IGNORE_INDEX} (the ignore label)")
        require(len(self.image_mean) == 3 and len(self.image_std) == 3,
                f"{p}.image_mean/image_std: need 3 values (RGB)")


LEARNED_ROUTER_DEFAULTS = dict(router_topk=2, renormalize=True, aux_loss_coeff=0.01)


@dataclass
class MoEConfig:
    """Med-MoE layers: E domain experts chosen by a fixed modality router + a meta expert.

    Defaults are the authors' release: 4 experts, top-1, MoE FFN in layers 0, 2, 4, ...,
    per-token routing with the router's softmax probabilities (not renormalised).
    """

    num_experts: int = option(4, "domain experts per MoE layer")
    router_topk: int = option(1, "experts each token is routed to (default 1 for the "
                              "modality router, 2 for the learned router)",
                              flag="--moe-router-topk")
    # int N: layers 0, N, 2N, ... are MoE; a list: one 0/1 per layer (Megatron's moe_layer_freq).
    layer_freq: Union[int, list] = option(2, "N: layers 0, N, 2N, ... are MoE; or a 0/1 list "
                                          "with one entry per layer", flag="--moe-layer-freq")
    # "modality": fixed, pretrained linear classifier (frozen); "learned": Megatron TopKRouter.
    router_type: Literal["modality", "learned"] = option(
        "modality", "modality: fixed pretrained classifier (needs a router file); learned: "
        "Megatron's TopKRouter trained in stage 3", flag="--moe-router-type")
    # "token": each token routed by its own state; "sample": by the sample's mean state.
    routing_granularity: Literal["token", "sample"] = option(
        "token", "route each token, or each sample by its mean hidden state",
        flag="--moe-routing-granularity")
    # None: the authors' rule, resolved on construction (their top-2 renormalises its two
    # weights, their top-1 takes the raw probability).
    renormalize: Optional[bool] = option(
        None, "renormalise the chosen top-k probabilities to sum to 1 (default: on for top-2, "
        "as the authors' code, off for top-1)", flag="--moe-router-renormalize")
    aux_loss_coeff: float = option(0.0, "load-balancing loss coefficient, learned router only "
                                   "(default 0.01 for it, as MoE-LLaVA)",
                                   flag="--moe-aux-loss-coeff")
    # Megatron's names; the learned router only (the modality router is fixed: no loss trains
    # it). None: aux_loss when aux_loss_coeff > 0, else none.
    load_balancing_type: Optional[Literal["aux_loss", "seq_aux_loss", "none"]] = option(
        None, "learned router: Megatron's load-balancing loss (aux_loss, seq_aux_loss: per "
        "sequence, none; default aux_loss with a coefficient)",
        flag="--moe-router-load-balancing-type", runtime=True)
    z_loss_coeff: Optional[float] = option(
        None, "learned router: Megatron's router z-loss coefficient (keeps the logits small)",
        flag="--moe-z-loss-coeff", runtime=True)
    token_dispatcher: Literal["alltoall", "allgather"] = option(
        "alltoall", "how tokens reach experts under expert parallelism (a run-time choice: a "
        "stage run may change it)", flag="--moe-token-dispatcher-type", runtime=True)
    meta_expert: bool = option(True, "the always-on meta expert, added unweighted",
                               flag="--moe-meta-expert")
    modalities: Optional[list] = None  # modality name of each expert (from the router file)

    @classmethod
    def from_choices(cls, chosen: dict) -> "MoEConfig":
        """The fields a user chose; the others default by router type (MoE-LLaVA's settings
        for the learned router: top-2 renormalised, aux loss 0.01) and top-k (the authors'
        top-2 renormalises its two weights, their top-1 takes the raw probability)."""
        defaults = LEARNED_ROUTER_DEFAULTS if chosen.get("router_type") == "learned" else {}
        return cls(**{**defaults, **chosen})

    def __post_init__(self):
        if self.renormalize is None:
            self.renormalize = self.router_topk == 2

    def moe_layers(self, num_layers: int) -> list[bool]:
        if isinstance(self.layer_freq, int):
            return [i % self.layer_freq == 0 for i in range(num_layers)]
        return [bool(x) for x in self.layer_freq]

    def validate(self, language: "LanguageConfig") -> None:
        p = "moe"
        require(isinstance(self.num_experts, int) and self.num_experts >= 2,
                f"{p}.num_experts={self.num_experts!r}: must be an integer >= 2")
        require(isinstance(self.router_topk, int) and 1 <= self.router_topk <= self.num_experts,
                f"{p}.router_topk={self.router_topk!r}: must be in [1, num_experts="
                f"{self.num_experts}]")
        if isinstance(self.layer_freq, int):
            require(self.layer_freq >= 1, f"{p}.layer_freq={self.layer_freq}: must be >= 1")
        else:
            require(len(self.layer_freq) == language.num_layers
                    and all(x in (0, 1, True, False) for x in self.layer_freq),
                    f"{p}.layer_freq={self.layer_freq!r}: a list needs one 0/1 per layer "
                    f"(language.num_layers={language.num_layers})")
        require(any(self.moe_layers(language.num_layers)),
                f"{p}.layer_freq={self.layer_freq!r} makes no layer an MoE layer")
        require(self.router_type in ("modality", "learned"),
                f"{p}.router_type={self.router_type!r}: must be 'modality' or 'learned'")
        require(self.routing_granularity in ("token", "sample"),
                f"{p}.routing_granularity={self.routing_granularity!r}: must be 'token' or "
                "'sample'")
        require(self.router_type == "modality" or self.routing_granularity == "token",
                f"{p}.routing_granularity='sample' needs router_type='modality'")
        require(not (self.router_type == "learned" and self.renormalize
                     and self.router_topk == 1),
                f"{p}.renormalize=True with router_topk=1 and router_type='learned': Megatron's "
                "TopKRouter gives no gradient to a renormalised single expert")
        require(self.token_dispatcher in ("alltoall", "allgather"),
                f"{p}.token_dispatcher={self.token_dispatcher!r}: must be 'alltoall' or "
                "'allgather'")
        require(self.aux_loss_coeff >= 0.0, f"{p}.aux_loss_coeff={self.aux_loss_coeff}: "
                "must be >= 0")
        require(self.router_type == "learned" or self.aux_loss_coeff == 0.0,
                f"{p}.aux_loss_coeff={self.aux_loss_coeff}: the fixed modality router has no "
                "load-balancing loss")
        fixed = [f for f, v in (("--moe-router-load-balancing-type", self.load_balancing_type
                                 not in (None, "none")),
                                ("--moe-z-loss-coeff", bool(self.z_loss_coeff))) if v]
        require(self.router_type == "learned" or not fixed,
                f"{', '.join(fixed)}: the fixed modality router is pretrained and frozen; no "
                "loss trains it (a learned-router baseline takes them: --moe-router-type "
                "learned at upcycling)")
        require(self.z_loss_coeff is None or self.z_loss_coeff >= 0,
                f"{p}.z_loss_coeff={self.z_loss_coeff}: must be >= 0")
        require(self.load_balancing_type in (None, "aux_loss", "seq_aux_loss", "none"),
                f"{p}.load_balancing_type={self.load_balancing_type!r}: must be aux_loss, "
                "seq_aux_loss or none")
        if self.modalities is not None:
            require(len(self.modalities) == self.num_experts,
                    f"{p}.modalities has {len(self.modalities)} names for num_experts="
                    f"{self.num_experts}")


@dataclass
class ModelConfig:
    language: LanguageConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: Optional[MoEConfig] = None
    vision: Optional[VisionConfig] = None
    lora: Optional[LoRAConfig] = None
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Activation recompute (a run-time choice, not saved with checkpoints), Megatron's meaning:
    # full recomputes whole layers, by method (uniform: chunks of num_layers layers; block:
    # the first num_layers layers); selective, the attention core only.
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    # Megatron's --calculate-per-token-loss (run-time): gradients over the global batch's tokens
    calculate_per_token_loss: bool = False
    # The learned router's expert capacity in training (run-time, never saved: inference and
    # exports compute every token): (capacity factor, drop policy, pad to capacity) or None.
    moe_capacity: Optional[tuple] = None

    def validate(self) -> "ModelConfig":
        self.language.validate()
        self.parallel.validate(self.language)
        if self.moe is not None:
            self.moe.validate(self.language)
        if self.vision is not None:
            self.vision.validate(self.language)
        if self.lora is not None:
            self.lora.validate(self.moe)
        self.parallel.validate_vision(self.vision)
        self.parallel.validate_experts(self.language, self.moe)
        require(self.recompute_granularity in (None, "full", "selective"),
                f"recompute_granularity={self.recompute_granularity!r}: must be None, 'full' "
                "or 'selective'")
        require(self.recompute_granularity == "full" or (
            self.recompute_method is None and self.recompute_num_layers is None),
            "--recompute-method / --recompute-num-layers: only with --recompute-granularity "
            "full (Megatron's rule)")
        require(self.recompute_num_layers is None or 1 <= self.recompute_num_layers
                <= self.language.num_layers,
                f"--recompute-num-layers {self.recompute_num_layers}: must be between 1 and the "
                f"model's {self.language.num_layers} layers")
        require(self.moe_capacity is None or (self.moe is not None
                                               and self.moe.router_type == "learned"),
                "--moe-expert-capacity-factor: only the learned-router baseline drops tokens; "
                "the fixed modality router sends every token to its modality's experts")
        require(self.params_dtype in ("float32", "bfloat16", "float16"),
                f"params_dtype={self.params_dtype!r}: must be float32, bfloat16 or float16")
        require(self.parallel.cross_entropy_loss_fusion is not True
                or self.params_dtype == "bfloat16",
                f"--cross-entropy-loss-fusion: Megatron's native fused cross-entropy returns the "
                f"logits' gradient in bfloat16, this model computes in {self.params_dtype}; "
                "drop the flag or train in bfloat16")
        return self

    # Architecture and storage dtype travel with checkpoints; the parallel layout does not.
    def to_json(self) -> str:
        data = {"language": dataclasses.asdict(self.language), "params_dtype": self.params_dtype}
        if self.moe is not None:
            data["moe"] = dataclasses.asdict(self.moe)
        if self.vision is not None:
            data["vision"] = dataclasses.asdict(self.vision)
        if self.lora is not None:
            data["lora"] = dataclasses.asdict(self.lora)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, parallel: Optional[ParallelConfig] = None) -> "ModelConfig":
        data = json.loads(text)
        for name, kind in (("language", LanguageConfig), ("moe", MoEConfig),
                           ("vision", VisionConfig), ("lora", LoRAConfig)):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(data.get(name) or {}) - known)
            require(not unknown, f"{name} config has unknown field(s) {unknown}")
        moe, vision, lora = data.get("moe"), data.get("vision"), data.get("lora")
        if vision is not None:  # JSON lists back to the dataclass' tuples
            vision = {k: tuple(v) if isinstance(v, list) else v for k, v in vision.items()}
        return cls(language=LanguageConfig(**data["language"]),
                   parallel=parallel or ParallelConfig(),
                   moe=MoEConfig(**moe) if moe is not None else None,
                   vision=VisionConfig(**vision) if vision is not None else None,
                   lora=LoRAConfig(**lora) if lora is not None else None,
                   params_dtype=data.get("params_dtype", "float32"))
