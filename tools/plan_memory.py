"""Training memory per GPU from the config (study/memory.py): weights, gradient buffers,
optimizer state, activations and the logits' gradient, for a stage, a layout and a micro-batch.

    python tools/plan_memory.py                                    # the paper's stage 3: Phi-2
                                                                   # Med-MoE, 4 experts top-2,
                                                                   # micro-batch 2, 2048 tokens
    python tools/plan_memory.py --search 8 --budget-gib 23         # every layout of 8 GPUs
    python tools/plan_memory.py --flavor tiny --num-layers 4 --measure   # against a real step

--search WORLD lists every layout of WORLD GPUs (TP x EP x DP, SP with TP, the distributed
optimizer, with and without full recompute) and marks the best: the one that fits the budget
with the least recompute, then the smallest TP, then the least memory. --measure runs one real
training step of the text-only language model in this process (TP = 1) and prints its peak
beside the plan: torch's peak allocated on a GPU; on CPU the rise of the process's peak resident
size over its size before the model was built (large allocations mapped and unmapped directly:
MALLOC_MMAP_THRESHOLD_ is set low when the tool starts, so freed memory leaves the process).
"""

import argparse
import dataclasses
import itertools
import json
import os
import resource
import sys

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # before glibc's
    # first large allocation: freed tensors leave the process, so its peak size is the step's
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def config(args, tp=1, sp=False, ep=1, recompute=None):
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.conventions import IMAGE_SENTINEL_ID

    lm = medmoe_language(args.flavor)
    lm = dataclasses.replace(lm, num_layers=args.num_layers or lm.num_layers,
                             max_position_embeddings=max(lm.max_position_embeddings,
                                                         args.seq_length))
    moe = MoEConfig(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                    renormalize=args.moe_router_topk == 2) if args.num_experts else None
    return ModelConfig(
        language=lm, moe=moe, params_dtype="bfloat16" if args.bf16 else "float32",
        vision=None if args.text_only else vision_flavor(args.flavor, IMAGE_SENTINEL_ID),
        lora=LoRAConfig(rank=args.lora_rank).resolve_targets(moe) if args.lora_rank else None,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                expert_model_parallel_size=ep),
        recompute_granularity=recompute).validate()


def layouts(world: int, experts: int):
    for tp in (t for t in (1, 2, 4, 8) if world % t == 0):
        for ep in (e for e in (1, 2, 4, 8) if world % e == 0
                   and (e == 1 or (experts and experts % e == 0))):
            for recompute in (None, "full"):
                yield tp, tp > 1, ep, world // tp, recompute


def measure(args) -> dict:
    """Peak bytes of one real training step of the text-only language model at TP = 1."""
    import torch

    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.setup import stage_model, token_step, wrap

    cfg = dataclasses.replace(config(args), vision=None)
    on_gpu = torch.cuda.is_available()
    before = 0 if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train = TrainConfig(stage=args.stage, train_iters=1, lr=1e-4, bf16=args.bf16)
    model, trainable = stage_model(cfg, train)
    setup = wrap(model, trainable, cfg, train)
    tokens = torch.randint(0, cfg.language.vocab_size, (args.micro_batch_size, args.seq_length),
                           device=next(model.parameters()).device)
    positions = torch.arange(args.seq_length, device=tokens.device).unsqueeze(0).expand(
        args.micro_batch_size, -1)
    token_step(setup, tokens, positions)  # Adam's state exists from the first step on
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    token_step(setup, tokens, positions)
    peak = torch.cuda.max_memory_allocated() if on_gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"config": cfg, "peak": peak, "device": "cuda" if on_gpu else "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flavor", default="phi2")
    p.add_argument("--num-layers", type=int, default=None, help="default: the flavor's")
    p.add_argument("--num-experts", type=int, default=4, help="0: dense")
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample, image "
                   "tokens included")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--text-only", action="store_true", help="the language model alone")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--recompute-activations", action="store_true", help="full recompute")
    p.add_argument("--search", type=int, default=0, metavar="WORLD",
                   help="every layout of WORLD GPUs, with the distributed optimizer")
    p.add_argument("--budget-gib", type=float, default=23.0)
    p.add_argument("--measure", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.study.memory import Step, in_gib, parameter_counts, plan

    parallel.initialize(ParallelConfig(), seed=1)  # the meta-device count runs at TP = 1
    try:
        base = config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = parameter_counts(dataclasses.replace(base, parallel=ParallelConfig()), args.stage)
    print(json.dumps({"parameters": counts}))
    if args.search:
        rows = []
        for tp, sp, ep, dp, recompute in layouts(args.search, args.num_experts):
            try:
                cfg = config(args, tp, sp, ep, recompute)
            except ConfigError:  # a layout this model cannot take (heads, FFN, vocabulary)
                continue
            gib = in_gib(plan(cfg, Step(args.stage, args.micro_batch_size, args.seq_length, dp,
                                        True), counts))
            rows.append(({"tp": tp, "sp": sp, "ep": ep, "dp": dp, "recompute": recompute}, gib))
        fits = [r for r in rows if r[1]["total"] <= args.budget_gib]
        best = min(fits, key=lambda r: (r[0]["recompute"] is not None, r[0]["tp"],
                                        r[1]["total"]), default=None)
        for layout, gib in rows:
            mark = " <- best" if best is not None and layout == best[0] else ""
            print(json.dumps({**layout, **gib}) + mark)
        if best is None:
            print(f"no layout of {args.search} GPUs fits {args.budget_gib} GiB")
        return 0
    cfg = config(args, args.tensor_model_parallel_size, args.sequence_parallel,
                 args.expert_model_parallel_size,
                 "full" if args.recompute_activations else None)
    step = Step(args.stage, args.micro_batch_size, args.seq_length, args.data_parallel_size,
                args.use_distributed_optimizer)
    predicted = plan(cfg, step, counts)
    print(json.dumps({"plan_gib": in_gib(predicted)}))
    if args.measure:
        result = measure(args)
        text_only = plan(result["config"], dataclasses.replace(step, data_parallel_size=1,
                                                               distributed_optimizer=False))
        print(json.dumps({"device": result["device"], "measured_peak_gib":
                          round(result["peak"] / 2 ** 30, 3), "plan_text_only_gib":
                          in_gib(text_only), "plan_over_measured":
                          round(text_only["total"] / result["peak"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
