"""Decode speed of the multimodal Med-MoE model on Megatron-Core's static KV cache: the time of
one new token at given positions (a KV cache keeps it nearly flat; recomputing the prefix would
grow linearly), and tokens/s at batch 1 vs batch B. A randomly initialised model of a flavor,
dense or Med-MoE; one process (TP=1).

    python tools/bench_decode.py --flavor tiny --positions 16 256 1024 --batch-sizes 1 8
    python tools/bench_decode.py --flavor phi2 --bf16 --num-experts 4 --moe-router-topk 2  # GPU

Prints one JSON line per batch size: ms per token step at each position, tokens/s.
"""

import argparse
import json
import statistics
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flavor", default="tiny")
    p.add_argument("--positions", type=int, nargs="+", default=[16, 256, 1024])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=16, help="decode steps timed at each position")
    p.add_argument("--num-experts", type=int, default=0, help="0: dense; else Med-MoE layers")
    p.add_argument("--moe-router-topk", type=int, default=1)
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="raise the flavor's limit to reach the largest position")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also report the share of a decode step the device is busy (CUDA)")
    args = p.parse_args(argv)

    import dataclasses

    import torch

    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.conventions import IMAGE_SENTINEL_ID
    from medmoe_mcore.inference.engine import KVCacheDecoder
    from medmoe_mcore.models.medmoe import MedMoEModel
    from medmoe_mcore.runtime import parallel

    parallel.initialize(ParallelConfig())
    longest = max(args.positions) + args.steps + 1
    lm = medmoe_language(args.flavor)
    lm = dataclasses.replace(lm, max_position_embeddings=max(
        lm.max_position_embeddings, args.max_position_embeddings or longest))
    moe = MoEConfig(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                    renormalize=args.moe_router_topk == 2) if args.num_experts else None
    cfg = ModelConfig(language=lm, moe=moe, vision=vision_flavor(args.flavor, IMAGE_SENTINEL_ID),
                      params_dtype="bfloat16" if args.bf16 else "float32")
    dev = parallel.device()
    model = MedMoEModel(cfg, parallel_output=False).to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for batch in args.batch_sizes:
        per_position = {}
        for position in args.positions:
            decoder = KVCacheDecoder(model, batch, position + args.steps + 1)
            ids = torch.randint(0, lm.vocab_size, (batch, position + args.steps), device=dev)
            with torch.inference_mode():
                embeds = model.language_model.embedding(input_ids=ids, position_ids=None)
                decoder.forward(embeds[:position])  # prefill
                times = []
                for s in range(args.steps):
                    sync()
                    start = time.perf_counter()
                    decoder.forward(embeds[position + s:position + s + 1])
                    sync()
                    times.append(time.perf_counter() - start)
            per_position[position] = statistics.median(times) * 1e3
            if args.profile and dev.type == "cuda" and position == args.positions[0]:
                busy = _device_busy_share(decoder, embeds[position:position + 1],
                                          per_position[position])
        if args.profile and dev.type == "cuda":
            print(json.dumps({"batch": batch, "position": args.positions[0],
                              "device_busy_share": round(busy[0], 3),
                              "kernels_per_step": busy[1]}), flush=True)
        ms = statistics.mean(per_position.values())
        print(json.dumps({"flavor": args.flavor, "device": str(dev), "dtype": cfg.params_dtype,
                          "experts": args.num_experts, "topk": args.moe_router_topk,
                          "batch": batch,
                          "ms_per_step": {k: round(v, 3) for k, v in per_position.items()},
                          "tokens_per_s": round(batch * 1e3 / ms, 1),
                          "threads": torch.get_num_threads()}), flush=True)
    return 0


def _device_busy_share(decoder, step_input, step_ms: float) -> tuple[float, int]:
    """(kernel time / wall time, kernel launches) of one decode step, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    decoder.context.sequence_len_offset -= 1  # re-run the last position (same cache slot)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.forward(step_input)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    return busy_ms / step_ms, len(kernels)


if __name__ == "__main__":
    sys.exit(main())
