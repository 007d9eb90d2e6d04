"""How a run executes, never saved with checkpoints (any layout, backend or kernel choice loads
any checkpoint): the process layout, the layer backend, the experts' compute, Megatron's fusions
and the collective timeout. Each field is also a command-line flag (training/arguments.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from medmoe_mcore.config.fields import option, require, require_positive_ints

# Megatron-LM's --transformer-impl values.
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def transformer_engine_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


# Megatron's fused bias + activation kernels (megatron/core/fusions, no TE or apex): the
# activation each computes exactly, as (LanguageConfig.activation, gated_linear_unit). Its
# fused GELU is the tanh form (Phi-2's gelu_new), never the erf GELU.
FUSED_ACTIVATION_OF_FLAG = {"bias_gelu_fusion": ("gelu_tanh", False),
                            "bias_swiglu_fusion": ("silu", True)}
_FUSION_DEFAULT = ("unset: on with CUDA, off on CPU, where compiling the fused function costs "
                   "more than it saves (docs/training.md)")


@dataclass
class ParallelConfig:
    """Process layout of a run and how its processes execute (never saved with checkpoints:
    any layout loads any checkpoint)."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks")
    sequence_parallel: bool = option(False, "split the sequence over the tensor-parallel ranks "
                                     "outside attention/MLP (needs TP > 1)")
    expert_model_parallel_size: int = option(1, "expert-parallel ranks (must divide the number "
                                             "of experts)")
    # Experts are whole on each rank by default (biased experts require it in Megatron).
    expert_tensor_parallel_size: int = option(1, "tensor-parallel ranks inside each expert "
                                              "(1 for biased experts such as Phi-2's)")
    pipeline_model_parallel_size: int = option(1, "pipeline stages (only 1 is supported)")
    context_parallel_size: int = option(1, "context-parallel ranks (only 1: Med-MoE's 2,048-token "
                                        "samples fit without it)")
    # How the run executes, never saved either: a checkpoint loads into either backend.
    transformer_impl: str = option(
        "local", "layer modules: Megatron-Core's local (PyTorch) ones, attention on torch SDPA, "
        "or Transformer Engine's (needs transformer_engine; checked against the local path "
        "by tools/check_backend.py)", choices=TRANSFORMER_IMPLS)
    distributed_timeout_minutes: int = option(
        10, "a collective that does not complete within this many minutes ends the run with "
        "an error (a stalled or lost rank), never a hang")
    moe_grouped_gemm: bool | None = option(
        None, "compute all local experts at once with grouped GEMMs (torch._grouped_mm; the "
        "same parameters and checkpoints as the sequential experts); unset: on with CUDA, off "
        "on CPU, where the sequential experts are faster (docs/moe.md)")
    # Megatron's own fusions that need neither TE nor apex (Megatron-LM's flags).
    bias_gelu_fusion: bool | None = option(
        None, "bias + tanh-GELU in one fused kernel (Phi-2's MLP and meta expert); " +
        _FUSION_DEFAULT)
    bias_swiglu_fusion: bool | None = option(
        None, "bias + SwiGLU in one fused kernel (StableLM's MLP and experts); " +
        _FUSION_DEFAULT)
    bias_dropout_fusion: bool | None = option(
        None, "bias + dropout + residual add in one fused kernel; " + _FUSION_DEFAULT)
    cross_entropy_loss_fusion: bool | None = option(
        None, "Megatron's native fused vocab-parallel cross-entropy (its logits' gradient is "
        "bfloat16: bfloat16 models only); " + _FUSION_DEFAULT)
    apply_rope_fusion: bool | None = option(
        None, "fused rotary embedding: Megatron's is Transformer Engine's kernel, so only "
        "with --transformer-impl transformer_engine (unset: on there, off on the local path)",
        flag="--rope-fusion")

    def validate(self, language) -> None:
        """Checked against the model's LanguageConfig (config/model.py)."""
        p = "parallel"
        tp = self.tensor_model_parallel_size
        require_positive_ints(self, p, ("tensor_model_parallel_size",
                                        "expert_model_parallel_size",
                                        "expert_tensor_parallel_size",
                                        "pipeline_model_parallel_size",
                                        "context_parallel_size",
                                        "distributed_timeout_minutes"))
        require(self.transformer_impl in TRANSFORMER_IMPLS,
                f"{p}.transformer_impl={self.transformer_impl!r} (--transformer-impl): must be "
                f"one of {list(TRANSFORMER_IMPLS)}")
        require(self.transformer_impl != "transformer_engine" or transformer_engine_importable(),
                "--transformer-impl transformer_engine: Transformer Engine is not installed "
                "here (no module named transformer_engine); use --transformer-impl local (the "
                "default) or a Transformer Engine image such as NGC PyTorch (docs/gpu.md)")
        require(self.pipeline_model_parallel_size == 1,
                f"{p}.pipeline_model_parallel_size={self.pipeline_model_parallel_size}: "
                "pipeline parallelism is not supported yet")
        require(self.context_parallel_size == 1,
                f"{p}.context_parallel_size={self.context_parallel_size} "
                "(--context-parallel-size): context parallelism is not built (Med-MoE's "
                "2,048-token samples fit without it); leave it at 1")
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "padded_vocab_size"):
            value = getattr(language, name)
            require(value % tp == 0,
                    f"{p}.tensor_model_parallel_size={tp} does not divide "
                    f"language.{name}={value}")
        require(not self.sequence_parallel or tp > 1,
                f"{p}.sequence_parallel=True needs tensor_model_parallel_size > 1 (got {tp})")
        model_act = (language.activation, language.gated_linear_unit)
        for name, act in FUSED_ACTIVATION_OF_FLAG.items():
            flag = "--" + name.replace("_", "-")
            require(getattr(self, name) is not True or model_act == act,
                    f"{flag}: the fused kernel computes {act[0]}{' (gated)' * act[1]}, this "
                    f"model's activation is language.activation={language.activation!r}"
                    f"{' (gated)' * language.gated_linear_unit}; drop the flag")
        require(self.apply_rope_fusion is not True or self.transformer_impl != "local",
                "--rope-fusion: Megatron's fused RoPE is Transformer Engine's kernel; with "
                "--transformer-impl local use --no-rope-fusion (or leave it unset)")

    def validate_vision(self, vision) -> None:
        """The vision tower and projector run on the language model's TP group, without SP."""
        if vision is None:
            return
        tp = self.tensor_model_parallel_size
        for name in ("num_attention_heads", "ffn_hidden_size"):
            value = getattr(vision, name)
            require(value % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not "
                    f"divide vision.{name}={value}")

    def validate_experts(self, language, moe) -> None:
        p = "parallel"
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if moe is None:
            require(ep == 1 and etp == 1, f"{p}.expert_model_parallel_size={ep} / "
                    f"expert_tensor_parallel_size={etp} need an MoE model (moe is None)")
            return
        require(moe.num_experts % ep == 0,
                f"{p}.expert_model_parallel_size={ep} does not divide moe.num_experts="
                f"{moe.num_experts}")
        require(etp == 1 or not language.add_bias_linear,
                f"{p}.expert_tensor_parallel_size={etp}: experts with biases "
                "(language.add_bias_linear=True) need 1")
        require(self.bias_gelu_fusion is not True or self.transformer_impl == "local",
                f"--bias-gelu-fusion with --transformer-impl {self.transformer_impl}: "
                "Megatron's own experts have no fused bias-GELU with the routing weight (the "
                "local experts fuse it); drop the flag or use --transformer-impl local")
        require(language.ffn_hidden_size % etp == 0,
                f"{p}.expert_tensor_parallel_size={etp} does not divide "
                f"language.ffn_hidden_size={language.ffn_hidden_size}")
