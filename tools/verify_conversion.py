"""Compare Megatron logits with the HF reference model on the same tokens.

    torchrun --nproc_per_node N tools/verify_conversion.py --hf-dir HF --load CKPT \\
        --tensor-model-parallel-size N

The last line printed (rank 0) is one JSON object with max_abs_logit_diff, tp, ep, ...; the exit
status is 1 when the difference exceeds --tolerance.
"""

import argparse
import json
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--load", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="sequence parallelism is on by default when TP > 1")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tolerance", type=float, default=None,
                   help="default 1e-4 for float32, 5e-2 x logit scale for bfloat16")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from medmoe_mcore import checkpointing, parallel
    from medmoe_mcore.config import ParallelConfig
    from medmoe_mcore.model import LanguageModel

    tp = args.tensor_model_parallel_size
    par = ParallelConfig(tensor_model_parallel_size=tp,
                         sequence_parallel=tp > 1 and not args.no_sequence_parallel,
                         expert_model_parallel_size=args.expert_model_parallel_size)
    parallel.initialize(par, seed=args.seed)
    cfg = checkpointing.read_config(args.load, par)
    cfg.params_dtype = args.dtype
    cfg.validate()
    if par.sequence_parallel and args.seq_length % tp:
        raise SystemExit(f"--seq-length {args.seq_length} must be divisible by TP={tp} with SP")
    device = parallel.device()
    dtype = getattr(torch, args.dtype)

    model = LanguageModel(cfg, parallel_output=False).to(device)
    checkpointing.load_into(model, args.load)
    model.eval()

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.language.vocab_size, (args.micro_batch_size, args.seq_length),
                           generator=gen).to(device)
    positions = torch.arange(args.seq_length, device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)[..., : cfg.language.vocab_size].float()
        # trust_remote_code: MoE exports carry their own model code (auto_map).
        hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype,
                                                  trust_remote_code=True).to(device).eval()
        ref = hf(input_ids=tokens).logits.float()
    diff = (logits - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    diff = diff.item()
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2 * max(1.0, ref.abs().max().item())
    result = {"max_abs_logit_diff": diff, "tp": tp, "ep": par.expert_model_parallel_size,
              "moe": cfg.moe is not None,
              "sp": par.sequence_parallel, "dtype": args.dtype, "family": cfg.language.family,
              "device": device.type, "tokens": list(tokens.shape), "tolerance": tolerance,
              "passed": diff <= tolerance}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
