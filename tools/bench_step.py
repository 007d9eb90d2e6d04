"""One training step of a Med-MoE stage 3 against the dense stage-2 step of the same model and
batch: time ratio against FLOP ratio, with a forward breakdown (attention, dense FFN, router,
token dispatch incl. all-to-all, experts, meta expert, combine).

    torchrun --nproc_per_node 2 tools/bench_step.py            # Phi-2 width, TP1 x EP2

Both steps are real training steps of our stack: the stage's trainable set (stage 2: the whole
language model; stage 3: experts + meta expert, the rest frozen), Megatron DDP (gradient
all-reduce, experts over the expert-data-parallel group), Megatron's Adam. FLOPs are what the
step really executes (torch's FlopCounterMode over forward and backward: a frozen weight
costs no weight gradient; the experts' in-place weight-gradient `addmm_`, which torch's table
lacks, counted as `addmm`; the attention core added in closed form), summed over ranks. The
modality router has random weights (tokens spread over experts); prints one JSON line per step
kind and one with the ratios.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MOE_PARTS = ("route", "dispatch", "routed_experts_compute", "shared_experts_compute", "combine")


def timed_parts(model, seconds: dict) -> None:
    """Forward time of each MoE part (instance attributes wrap Megatron's MoELayer methods;
    its code is unchanged), of attention, and of dense FFNs."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    def wrap(fn, key):
        def timed(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            seconds[key] += time.perf_counter() - start
            return out
        return timed

    for module in model.modules():
        if isinstance(module, MoELayer):
            for part in MOE_PARTS:
                setattr(module, part, wrap(getattr(module, part), part))
        if hasattr(module, "self_attention") and hasattr(module, "mlp"):
            module.self_attention.forward = wrap(module.self_attention.forward, "attention")
            if not isinstance(module.mlp, MoELayer):
                module.mlp.forward = wrap(module.mlp.forward, "dense_ffn")


def run(name, cfg, stage, args):
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

    from medmoe_mcore.models.moe.router import ModalityRouter
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training import setup as training_setup
    from medmoe_mcore.training.config import TrainConfig

    parallel.initialize(cfg.parallel, seed=1)
    train = TrainConfig(stage=stage, train_iters=100, lr=1e-5)
    model, trainable = training_setup.stage_model(cfg, train)
    if cfg.moe is not None:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for m in model.modules():
                if isinstance(m, ModalityRouter):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    setup = training_setup.wrap(model, trainable, cfg, train)
    gen = torch.Generator().manual_seed(dist.get_rank())
    b, seq = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, cfg.language.vocab_size, (b, seq), generator=gen)
    positions = torch.arange(seq).unsqueeze(0).expand(b, -1)

    def step():
        training_setup.token_step(setup, tokens, positions)

    step()  # warm-up
    # torch's counter has no formula for CPU SDPA: the attention core (QK^T and AV, 4 s^2 h
    # per sample forward, twice that backward when its input needs a gradient) is added
    needs_grad = []
    hooks = [layer.self_attention.register_forward_pre_hook(
        lambda m, a, k: needs_grad.append((a[0] if a else k["hidden_states"]).requires_grad),
        with_kwargs=True) for layer in model.decoder.layers]
    in_place = {torch.ops.aten.addmm_:  # moe/expert_linear.py's weight gradients
                lambda self_shape, a_shape, b_shape, *args, **kwargs: mm_flop(a_shape, b_shape)}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        step()
    for h in hooks:
        h.remove()
    core = 4 * b * seq * seq * cfg.language.hidden_size
    flops = torch.tensor(float(counter.get_total_flops() + sum(
        core * (3 if grad else 1) for grad in needs_grad)))
    dist.all_reduce(flops)
    seconds = defaultdict(float)
    timed_parts(model, seconds)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    breakdown = {k: round(v / args.steps * 1000, 1) for k, v in sorted(seconds.items())}
    result = {"step": name, "step_s": round(statistics.median(times), 3),
              "flops_all_ranks": flops.item(), "trainable_parameters_this_rank":
              sum(p.numel() for p in model.parameters() if p.requires_grad),
              "forward_ms_this_rank": breakdown}
    parallel.log(json.dumps(result))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=2560)
    p.add_argument("--ffn-hidden-size", type=int, default=10240)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--expert-model-parallel-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    from medmoe_mcore.config import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.flavors import PHI_BLOCK
    from medmoe_mcore.runtime import parallel

    lm = LanguageConfig(**PHI_BLOCK, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                        num_query_groups=args.num_attention_heads,
                        ffn_hidden_size=args.ffn_hidden_size,
                        max_position_embeddings=args.seq_length, rotary_percent=0.4)
    moe = MoEConfig(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                    renormalize=args.moe_router_topk == 2)
    dense = run("dense stage 2", ModelConfig(language=lm).validate(), 2, args)
    sparse = run("Med-MoE stage 3", ModelConfig(
        language=lm, moe=moe, parallel=ParallelConfig(
            expert_model_parallel_size=args.expert_model_parallel_size)).validate(), 3, args)
    time_ratio = sparse["step_s"] / dense["step_s"]
    flop_ratio = sparse["flops_all_ranks"] / dense["flops_all_ranks"]
    parallel.log(json.dumps({"time_ratio": round(time_ratio, 3),
                             "flop_ratio": round(flop_ratio, 3),
                             "time_over_flop_ratio": round(time_ratio / flop_ratio, 3),
                             "target": "<= 1.15"}))


if __name__ == "__main__":
    main()
