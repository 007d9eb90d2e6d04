"""Forward+backward time of one Med-MoE layer (modality router, top-k of E experts + meta
expert; Megatron-Core MoELayer with the alltoall dispatcher, our lean experts) against

  dense:     (k + 1) dense FFNs of the same shape on all tokens: the compute it must do;
  reference: a DeepSpeed-style layer as in the authors' code: no token dropping, so every
             expert is padded to the largest per-expert load, one-hot dispatch/combine
             einsums, plus the meta expert (left out, and said, when its [T, E, capacity]
             dispatch tensor would pass 1 GiB);
  megatron:  the same MoELayer with Megatron's own SequentialMLP experts (scale on the
             [T, FFN] activation);
  grouped:   the same MoELayer with our grouped experts (--moe-grouped-gemm:
             torch._grouped_mm, all local experts per product).

Both MoE layers run as they train: inside Megatron's DistributedDataParallel (one rank),
weight gradients into its float32 buffer; the dense FFNs are plain autograd (after the warm-up
their gradients accumulate into kept tensors, the cheapest dense case).

Two routing regimes: balanced (random router) and modality-skewed (a batch of one modality:
nearly every token picks the same top-k). Prints a JSON line per expert count and regime; the
same tokens for every expert count. Each layer is timed in pairs with the dense FFNs (dense, then
the layer, --repeats times after a warm-up): the box drifts by 10 % and more within minutes, so
a ratio is the median of the pairs' ratios, and the times printed are the medians.

Each expert count runs in a process of its own, so that its figures do not depend on what ran
before it: in one process the earlier counts' layers are not all freed when the next is built
(E = 16 then 64: 18.4 GB resident on the 24 GB box, against 14.4 GB for E = 64 alone; the peak
resident size is printed).

    python tools/bench_moe.py --hidden 1024 --ffn 4096 --tokens 4096 --num-experts 2,4,16,64
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn):
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def timed_against(fn, baseline, repeats):
    """(median time of fn, median time of baseline, median of their paired ratios)."""
    fn(), baseline()  # warm-up
    pairs = [(clock(baseline), clock(fn)) for _ in range(repeats)]
    return (statistics.median(t for _, t in pairs), statistics.median(b for b, _ in pairs),
            statistics.median(t / b for b, t in pairs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--num-experts", default="4", help="comma-separated expert counts")
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameters and activations (the gradient buffer stays float32)")
    args = p.parse_args(argv)
    counts = [int(e) for e in args.num_experts.split(",")]
    if len(counts) > 1:  # one fresh process per expert count (see the docstring)
        for E in counts:  # every parsed option passed on, --num-experts narrowed to E
            options = {**vars(args), "num_experts": E}
            subprocess.run([sys.executable, __file__, *(item for key, value in options.items()
                            for item in (f"--{key.replace('_', '-')}", str(value)))], check=True)
        return

    import dataclasses

    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module

    from medmoe_mcore.config.flavors import PHI_BLOCK
    from medmoe_mcore.config.model import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.models.moe.experts import GroupedExperts
    from medmoe_mcore.models.moe.spec import moe_mlp_spec
    from medmoe_mcore.models.specs.backends import LOCAL
    from medmoe_mcore.models.transformer_config import language_transformer_config
    from medmoe_mcore.runtime import parallel

    k, H, Fh, T = args.moe_router_topk, args.hidden, args.ffn, args.tokens
    parallel.initialize(ParallelConfig())
    dev, dtype = parallel.device(), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x0 = torch.randn(T, 1, H, device=dev, dtype=dtype)

    def ffn_params():
        return [(t * 0.02 if t.dim() == 2 else t).to(dev, dtype).requires_grad_()
                for t in (torch.randn(Fh, H), torch.zeros(Fh), torch.randn(H, Fh),
                          torch.zeros(H))]

    def ffn(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    dense = [ffn_params() for _ in range(k + 1)]

    def run_dense():
        x = x0.reshape(T, H).clone().requires_grad_()
        sum(ffn(x, *w) for w in dense).sum().backward()

    (E,) = counts
    lm = LanguageConfig(**PHI_BLOCK, vocab_size=128, hidden_size=H, num_layers=1,
                        num_attention_heads=8, num_query_groups=8, ffn_hidden_size=Fh,
                        max_position_embeddings=T, rotary_percent=0.5)
    moe = MoEConfig(num_experts=E, router_topk=k, layer_freq=1)
    config = language_transformer_config(ModelConfig(language=lm, moe=moe,
                                                     params_dtype=args.dtype).validate())
    layers = {name: build_module(moe_mlp_spec(moe, backend), config=config, layer_number=1)
              for name, backend in (
                  ("medmoe", LOCAL),
                  ("megatron", dataclasses.replace(LOCAL, experts=SequentialMLP)),
                  ("grouped", dataclasses.replace(LOCAL, experts=GroupedExperts)))}
    for name in ("megatron", "grouped"):
        layers[name].load_state_dict(layers["medmoe"].state_dict())
    trained = {name: DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), layer) for name, layer in layers.items()}
    ref_experts = [ffn_params() for _ in range(E)]
    ref_meta = ffn_params()
    router = layers["medmoe"].router

    def set_router(regime):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in layers.values():
                if regime == "balanced":
                    layer.router.weight.copy_(torch.randn(E, H, generator=gen))
                    layer.router.bias.zero_()
                else:  # one modality: the same top-k for (nearly) every token
                    layer.router.weight.copy_(torch.randn(E, H, generator=gen) * 1e-3)
                    layer.router.bias.copy_(torch.tensor([8.0 - i for i in range(E)]))

    def run_layer(layer):
        x = x0.clone().requires_grad_()
        out, _ = layer(x)
        out.sum().backward()

    def run_reference():
        x = x0.reshape(T, H).clone().requires_grad_()
        gates = torch.softmax(F.linear(x.float(), router.weight, router.bias), -1)
        top, index = gates.topk(k, dim=-1)
        mask = torch.zeros_like(gates).scatter(1, index, 1.0)  # [T, E]
        capacity = int(mask.sum(0).max())  # no dropping: pad to the largest load
        slot = (torch.cumsum(mask, 0) - 1) * mask  # position of each token in its expert
        dispatch = F.one_hot(slot.long(), capacity).float() * mask.unsqueeze(-1)
        combine = (dispatch * torch.zeros_like(gates).scatter(1, index, top).unsqueeze(-1)
                   ).to(x.dtype)
        dispatch = dispatch.to(x.dtype)
        expert_in = torch.einsum("tec,tm->ecm", dispatch, x)
        expert_out = torch.stack([ffn(expert_in[e], *ref_experts[e]) for e in range(E)])
        out = torch.einsum("tec,ecm->tm", combine, expert_out) + ffn(x, *ref_meta)
        out.sum().backward()

    for regime in ("balanced", "skewed"):
        set_router(regime)
        with torch.no_grad():
            _, routing_map = router(x0)
        load = routing_map.sum(0).tolist()
        timings = {"medmoe": timed_against(lambda: run_layer(trained["medmoe"]), run_dense,
                                           args.repeats),
                   "megatron": timed_against(lambda: run_layer(trained["megatron"]),
                                             run_dense, args.repeats),
                   "grouped": timed_against(lambda: run_layer(trained["grouped"]), run_dense,
                                            args.repeats)}
        dispatch_gib = T * E * max(load) * 4 / 2 ** 30
        if dispatch_gib <= 1:
            timings["reference"] = timed_against(run_reference, run_dense, args.repeats)
        ref = timings.get("reference")
        print(json.dumps({
            "regime": regime, "tokens": T, "hidden": H, "ffn": Fh, "experts": E, "topk": k,
            "tokens_per_expert_max_mean": [max(load), round(sum(load) / E, 1)],
            "threads": torch.get_num_threads(),
            "medmoe_s": round(timings["medmoe"][0], 4),
            "megatron_sequential_mlp_s": round(timings["megatron"][0], 4),
            "grouped_s": round(timings["grouped"][0], 4),
            "dense_k_plus_1_ffn_s": round(timings["medmoe"][1], 4),
            "deepspeed_style_s": None if ref is None else round(ref[0], 4),
            "medmoe_vs_dense": round(timings["medmoe"][2], 3),
            "megatron_vs_dense": round(timings["megatron"][2], 3),
            "grouped_vs_dense": round(timings["grouped"][2], 3),
            "reference_vs_dense": None if ref is None else round(ref[2], 3),
            "reference_skipped": None if ref is not None else
            f"dispatch tensor {dispatch_gib:.1f} GiB",
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                                  2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            if dev.type == "cuda" else None}), flush=True)


if __name__ == "__main__":
    main()
