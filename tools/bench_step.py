"""One training step of a Med-MoE stage 3 against the dense stage-2 step of the same model and
batch, for one or more expert counts: time ratio against FLOP ratio, tokens/s, MFU, peak memory,
and a forward breakdown (attention, dense FFN, router, token dispatch incl. all-to-all, experts,
meta expert, combine).

    torchrun --nproc_per_node 2 tools/bench_step.py            # Phi-2 width, TP1 x EP2, CPU
    torchrun --nproc_per_node 1 tools/bench_step.py --bf16 --vocab-size 51200 \
        --seq-length 2048 --micro-batch-size 4 --expert-model-parallel-size 1 \
        --num-experts 4,8,16 --steps 5                          # one GPU: tokens/s and MFU

Both steps are real training steps of our stack: the stage's trainable set (stage 2: the whole
language model; stage 3: experts + meta expert, the rest frozen), Megatron DDP (gradient
all-reduce, experts over the expert-data-parallel group), Megatron's Adam (its mixed-precision
optimizer under --bf16, CUDA only). Core attention is our local spec's (torch's SDPA kernels).
FLOPs are what the step really executes (torch's FlopCounterMode over forward and backward: a
frozen weight costs no weight gradient; the experts' in-place weight-gradient `addmm_`, which
torch's table lacks, counted as `addmm`; the attention core added in closed form where the
counter has no formula for the SDPA kernel, as on CPU), summed over ranks. MFU = those FLOPs per
second over the GPUs' dense peak (--peak-tflops, or known from the GPU's name; none on CPU).
The modality router has random weights (tokens spread over experts). Steps are timed without
the breakdown's timers, which run in one extra step (synchronising the GPU around each part).
Prints one JSON line per step kind and one with the ratios per expert count.
"""

import argparse
import json
import statistics
import time
from collections import defaultdict

MOE_PARTS = ("route", "dispatch", "routed_experts_compute", "shared_experts_compute", "combine")
# Dense bf16 peak TFLOP/s by GPU name (NVIDIA's datasheets; SXM parts unless named), for MFU.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def timed_parts(model, seconds: dict, synchronize) -> None:
    """Forward time of each MoE part (instance attributes wrap Megatron's MoELayer methods;
    its code is unchanged), of attention, and of dense FFNs."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    def wrap(fn, key):
        def timed(*a, **k):
            synchronize()
            start = time.perf_counter()
            out = fn(*a, **k)
            synchronize()
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


def peak_tflops(asked, device):
    """The GPU's dense peak for MFU: --peak-tflops, else by the GPU's name; None on CPU."""
    import torch

    if asked is not None or device.type != "cuda":
        return asked
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def counted_flops(step, model, cfg, args):
    """FLOPs of one step on this rank (see the module's docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

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
    if any("attention" in str(op) for op in counter.get_flop_counts().get("Global", {})):
        return counter.get_total_flops()  # the SDPA kernel has a formula (CUDA)
    # QK^T and AV: 4 s^2 h per sample forward, twice that backward when its input needs one
    core = 4 * args.micro_batch_size * args.seq_length ** 2 * cfg.language.hidden_size
    return counter.get_total_flops() + sum(core * (3 if grad else 1) for grad in needs_grad)


def run(name, cfg, stage, args):
    import gc

    import torch
    import torch.distributed as dist

    from medmoe_mcore.models.moe.modality_router import ModalityRouter
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
    device = parallel.device()
    on_gpu = device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    gen = torch.Generator().manual_seed(dist.get_rank())
    b, seq = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, cfg.language.vocab_size, (b, seq), generator=gen).to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(b, -1)

    def step():
        training_setup.token_step(setup, tokens, positions)

    step(), step()  # warm-up (allocator, kernels' autotuning)
    flops = torch.tensor(float(counted_flops(step, model, cfg, args)), dtype=torch.float64,
                         device=device)
    dist.all_reduce(flops)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    memory = None
    if on_gpu:
        most = torch.tensor(float(torch.cuda.max_memory_allocated()), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        memory = round(most.item() / 2 ** 30, 2)
    seconds = defaultdict(float)
    timed_parts(model, seconds, synchronize)
    step()
    step_s = statistics.median(times)
    world = dist.get_world_size()
    peak = peak_tflops(args.peak_tflops, device)
    if peak is None and on_gpu:
        parallel.log(f"MFU not computed: no known peak for {torch.cuda.get_device_name(device)!r}"
                     "; pass --peak-tflops")
    result = {"step": name, "num_experts": cfg.moe.num_experts if cfg.moe else 0,
              "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
              "dtype": cfg.params_dtype, "ranks": world,
              "core_attention": type(model.decoder.layers[0].self_attention.core_attention
                                     ).__name__,
              "step_s": round(step_s, 4), "tokens_per_s": round(world * b * seq / step_s, 1),
              "flops_all_ranks": flops.item(), "flops_per_token": flops.item() / (world * b * seq),
              "mfu": None if peak is None else
              float(f"{flops.item() / step_s / (world * peak * 1e12):.4g}"),
              "peak_tflops_per_rank": peak, "peak_memory_gib_max_rank": memory,
              "trainable_parameters_this_rank":
              sum(p.numel() for p in model.parameters() if p.requires_grad),
              "forward_ms_this_rank": {k: round(v * 1000, 1) for k, v in sorted(seconds.items())}}
    parallel.log(json.dumps(result))
    del setup, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
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
    p.add_argument("--num-experts", default="4", help="comma-separated expert counts")
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--expert-model-parallel-size", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bfloat16 (CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak per GPU for MFU (default: by GPU name, "
                   f"{', '.join(f'{k} {v:g}' for k, v in PEAK_BF16_TFLOPS)})")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                   help="the experts as grouped GEMMs (default: the device's, docs/moe.md)")
    args = p.parse_args(argv)

    from medmoe_mcore.config.flavors import PHI_BLOCK
    from medmoe_mcore.config.model import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.config import TrainConfig

    TrainConfig(bf16=args.bf16).check_precision()  # --bf16 refused on CPU before any work
    experts = [int(e) for e in args.num_experts.split(",")]
    dtype = "bfloat16" if args.bf16 else "float32"
    lm = LanguageConfig(**PHI_BLOCK, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                        num_query_groups=args.num_attention_heads,
                        ffn_hidden_size=args.ffn_hidden_size,
                        max_position_embeddings=args.seq_length, rotary_percent=0.4)
    layout = ParallelConfig(expert_model_parallel_size=args.expert_model_parallel_size,
                            moe_grouped_gemm=args.moe_grouped_gemm)
    moe_configs = [ModelConfig(language=lm, params_dtype=dtype, parallel=layout, moe=MoEConfig(
        num_experts=e, router_topk=args.moe_router_topk, renormalize=args.moe_router_topk == 2)
    ).validate() for e in experts]  # every point's flags checked before the first step
    dense = run("dense stage 2", ModelConfig(language=lm, params_dtype=dtype).validate(), 2, args)
    for cfg in moe_configs:
        sparse = run("Med-MoE stage 3", cfg, 3, args)
        time_ratio = sparse["step_s"] / dense["step_s"]
        flop_ratio = sparse["flops_all_ranks"] / dense["flops_all_ranks"]
        parallel.log(json.dumps({"num_experts": cfg.moe.num_experts,
                                 "time_ratio": round(time_ratio, 3),
                                 "flop_ratio": round(flop_ratio, 3),
                                 "time_over_flop_ratio": round(time_ratio / flop_ratio, 3),
                                 "target": "<= 1.15"}))


if __name__ == "__main__":
    main()
