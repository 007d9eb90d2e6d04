"""Megatron-LM flags this trainer knows and does not take, each with the reason and what to use
instead; and the parse that uses them: a recipe copied from Megatron-LM or Megatron-Bridge gets,
for every flag it cannot pass, one line naming the flag and why (or, for a flag nobody knows,
the nearest flag names), never argparse's bare "unrecognized arguments"."""

from __future__ import annotations

import argparse
import difflib

_SHAPE = ("the model's shape comes from its checkpoint (--pretrained-checkpoint / --load; the "
          "demo pipeline: --flavor); a stage never changes it")
_DATA = ("data are energon datasets or Med-MoE JSON (--data-path; docs/data.md), tokenised "
         "with the checkpoint's own tokenizer (--tokenizer to override)")
_ROUTING = ("routing is chosen when a dense checkpoint is upcycled (tools/upcycle_to_moe.py: "
            "--moe-router-type, --moe-aux-loss-coeff)")

UNSUPPORTED = {
    # model shape and initialisation
    **dict.fromkeys(("--num-layers", "--hidden-size", "--ffn-hidden-size",
                     "--num-attention-heads", "--num-query-groups", "--group-query-attention",
                     "--kv-channels", "--max-position-embeddings", "--position-embedding-type",
                     "--rotary-percent", "--rotary-base", "--normalization", "--norm-epsilon",
                     "--swiglu", "--squared-relu", "--disable-bias-linear", "--add-qkv-bias",
                     "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by",
                     "--init-method-std", "--attention-dropout", "--hidden-dropout",
                     "--apply-layernorm-1p", "--qk-layernorm", "--moe-ffn-hidden-size",
                     "--moe-shared-expert-intermediate-size"), _SHAPE),
    # data and tokenizer
    **dict.fromkeys(("--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file",
                     "--vocab-size", "--data-cache-path", "--dataloader-type",
                     "--mock-data"), _DATA),
    "--split": "validation data come from --valid-data-path, never a split of --data-path",
    # MoE routing
    **dict.fromkeys(("--moe-router-score-function", "--moe-router-pre-softmax",
                     "--moe-input-jitter-eps"), _ROUTING),
    # parallelism and precision this system does not run
    "--virtual-pipeline-model-parallel-size": "pipeline parallelism is not built; leave it out",
    "--num-layers-per-virtual-pipeline-stage": "pipeline parallelism is not built; leave it out",
    "--fp16": "float16 training needs loss scaling, which this trainer does not do; use --bf16",
    "--fp8-format": "FP8 needs Transformer Engine's FP8 recipes, which this trainer does not "
                    "run; use --bf16",
    "--fp8-recipe": "FP8 is not run; use --bf16",
    "--use-flash-attn": "core attention runs on torch's SDPA kernels (flash where the GPU has "
                        "them) or on TE's with --transformer-impl transformer_engine",
    "--attention-backend": "core attention runs on torch's SDPA kernels (flash where the GPU "
                           "has them) or on TE's with --transformer-impl transformer_engine",
    # what trains
    "--freeze-LM": "--stage decides what trains: stage 1 the projector, 2 the projector and "
                   "the language model, 3 the experts, meta expert and dense FFNs",
    "--freeze-ViT": "the vision tower never trains in Med-MoE (every stage)",
    # not built yet
    "--moe-router-dtype": "the router always computes in float32 (the authors' fp32 gate)",
}
# Megatron-LM switches that state what this trainer always does: taken, and said once.
ALWAYS = {
    "--use-mcore-models": "the models are always Megatron-Core's",
    "--no-position-embedding": "positions are rotary (no learned position embedding)",
    "--no-masked-softmax-fusion": "core attention runs on torch's SDPA kernels (no separate "
                                  "masked softmax)",
}


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with every flag it does not take named in one error: the
    reason from UNSUPPORTED, or the nearest flags of `parser`. Flags of ALWAYS are taken and
    said."""
    from medmoe_mcore.runtime.parallel import log

    args, unknown = parser.parse_known_args(argv)
    for flag in (f for f in unknown if ALWAYS.get(f)):
        log(f"{flag}: {ALWAYS[flag]}")
    unknown = [item for item in unknown if item not in ALWAYS]
    flags = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    if unknown:
        known = [s for action in parser._actions for s in action.option_strings]
        lines = [f"{flag}: {UNSUPPORTED[flag]}" if flag in UNSUPPORTED else
                 f"{flag}: not a flag of this trainer" + _nearest(flag, known) for flag in flags]
        parser.error("\n  ".join(lines or [f"unexpected value(s): {' '.join(unknown)}"]))
    return args


def _nearest(flag: str, known: list[str]) -> str:
    close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
    return f" (nearest: {', '.join(close)})" if close else ""
