"""Core attention at Med-MoE's sequence length: Megatron's unfused DotProductAttention vs our
SDPA core attention (models/specs/sdpa.py), forward + backward, one fresh process each.

    python tools/bench_attention.py [--seq-length 2624] [--heads 32] [--head-dim 80]

Phi-2's attention shape; 2,624 = 576 image tokens + 2,048 text; causal (the language model).
Reports seconds per forward+backward (median of --repeats after a warm-up) and the peak RSS
the attention adds over its inputs (ru_maxrss after minus before). One JSON line per run.
"""

import argparse
import json
import subprocess
import sys


def measure(kind: str, seq: int, heads: int, head_dim: int, repeats: int) -> dict:
    import resource
    import statistics
    import time

    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.models.specs.sdpa import SDPAttention
    from medmoe_mcore.runtime import parallel

    parallel.initialize(ParallelConfig())
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            attention_dropout=0.0, attention_softmax_in_fp32=True)
    module = (SDPAttention if kind == "sdpa" else DotProductAttention)(
        cfg, 1, AttnMaskType.causal, "self")
    q, k, v = (torch.randn(seq, 1, heads, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(seq, 1, heads * head_dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        module(q, k, v, None).backward(grad)
        times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"attention": kind, "seq_length": seq, "heads": heads, "head_dim": head_dim,
            "seconds_fwd_bwd": statistics.median(times[1:]),
            "peak_rss_added_mb": after - before, "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-length", type=int, default=2624)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure", choices=["unfused", "sdpa"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.seq_length, args.heads, args.head_dim,
                                 args.repeats)), flush=True)
        return 0
    for kind in ("unfused", "sdpa"):
        r = subprocess.run([sys.executable, __file__, "--measure", kind, "--seq-length",
                            str(args.seq_length), "--heads", str(args.heads), "--head-dim",
                            str(args.head_dim), "--repeats", str(args.repeats)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        print(r.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
