"""Training memory of a Med-MoE stage 3, full fine-tuning vs LoRA (the paper's Med-LoRAMoE,
Tables 7-8): trainable parameters, optimizer state (Adam moments + fp32 main copies of bf16
weights), gradient buffers and the peak memory of a training step, per rank.

    python tools/bench_lora_memory.py                       # full, LoRA 128, LoRA 256
    python tools/bench_lora_memory.py --lora-ranks 64 --num-layers 2 --seq-length 256

Phi-2 width (hidden 2560, FFN 10240, 32 heads; fewer layers than its 32 on CPU), every other
layer Med-MoE (4 experts top-2 + meta expert), Megatron DDP and Megatron's Adam; bf16
weights with fp32 main copies on GPU, float32 on CPU (Megatron's mixed-precision optimizer
needs CUDA tensors). Each variant runs in its own process (a process's peak memory never
goes down): the peak is torch's max allocated on GPU, the process's peak RSS on CPU (which also
holds the Python runtime and libraries: `baseline` is that RSS before the model exists).
Prints one JSON line per variant, then a Markdown table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args, rank: int | None) -> dict:
    """One variant (LoRA rank or None for full fine-tuning) in this process."""
    import torch

    from medmoe_mcore.config.flavors import PHI_BLOCK
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training import setup as training_setup
    from medmoe_mcore.training.config import TrainConfig

    baseline = _peak_bytes()
    lm = LanguageConfig(**PHI_BLOCK, vocab_size=args.vocab_size, hidden_size=2560,
                        num_layers=args.num_layers, num_attention_heads=32, num_query_groups=32,
                        ffn_hidden_size=10240, max_position_embeddings=args.seq_length,
                        rotary_percent=0.4)
    moe = MoEConfig(num_experts=4, router_topk=2)
    lora = None if rank is None else \
        LoRAConfig(rank=rank, dropout=0.05).resolve_targets(moe)
    bf16 = torch.cuda.is_available()  # Megatron's mixed-precision optimizer needs CUDA
    cfg = ModelConfig(language=lm, moe=moe, lora=lora,
                      params_dtype="bfloat16" if bf16 else "float32",
                      parallel=ParallelConfig()).validate()
    parallel.initialize(cfg.parallel, seed=1)
    train = TrainConfig(stage=3, train_iters=100, lr=1e-5, bf16=bf16)
    model, trainable = training_setup.stage_model(cfg, train)
    setup = training_setup.wrap(model, trainable, cfg, train)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, lm.vocab_size, (args.micro_batch_size, args.seq_length),
                           generator=gen).to(parallel.device())
    positions = torch.arange(args.seq_length, device=tokens.device).unsqueeze(0) \
        .expand_as(tokens)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = training_setup.token_step(setup, tokens, positions)
        times.append(time.perf_counter() - start)
    # torch's Adam inside Megatron's optimizers (dense and expert ones, chained); with bf16
    # its parameters are the fp32 main copies, with float32 the model's own
    inners = [o.optimizer for o in getattr(setup.optimizer, "chained_optimizers",
                                           [setup.optimizer])]
    moments = sum(t.numel() * t.element_size() for inner in inners
                  for s in inner.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    main_copies = sum(p.numel() * p.element_size() for inner in inners
                      for g in inner.param_groups for p in g["params"]) if bf16 else 0
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for b in setup.ddp.buffers + setup.ddp.expert_parallel_buffers)
    return {"variant": "full fine-tuning" if rank is None else f"LoRA rank {rank}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters()
                                        if p.requires_grad),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer_state_bytes": moments + main_copies,
            "gradient_buffer_bytes": grads,
            "peak_bytes": _peak_bytes(), "baseline_bytes": baseline,
            "peak_kind": "cuda max allocated" if torch.cuda.is_available() else
                         "process peak RSS",
            "dtype": cfg.params_dtype,
            "step_s": round(min(times[1:] or times), 2), "loss": round(loss.item(), 4)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | trainable params | optimizer state GiB | grad buffers GiB | "
             "weights GiB | peak GiB (baseline) | step s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_parameters'] / 1e6:.1f} M of "
                     f"{r['parameters'] / 1e6:.0f} M | {r['optimizer_state_bytes'] / GIB:.2f} | "
                     f"{r['gradient_buffer_bytes'] / GIB:.2f} | {r['weights_bytes'] / GIB:.2f} | "
                     f"{r['peak_bytes'] / GIB:.2f} ({r['baseline_bytes'] / GIB:.2f}) | "
                     f"{r['step_s']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lora-ranks", type=int, nargs="+", default=[128, 256])
    p.add_argument("--num-layers", type=int, default=4, help="Phi-2 has 32")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=51200)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: 'full' or a rank
    args = p.parse_args(argv)
    if args.one is not None:
        result = measure(args, None if args.one == "full" else int(args.one))
        print(json.dumps(result), flush=True)
        return 0
    rows = []
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    for one in ["full", *map(str, args.lora_ranks)]:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--one", one],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
