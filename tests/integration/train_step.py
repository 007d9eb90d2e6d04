"""One forward/backward through Megatron DDP + finalize_model_grads, run under torchrun.

Rank 0 writes the loss and every parameter's full (TP-gathered) gradient to --out, so that a
test can compare TP=1 against TP=2 with sequence parallelism.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gather import full_grads  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--drop-sp-tag", action="store_true",
                   help="negative control: forget the norms' sequence_parallel tag")
    p.add_argument("--recompute", action="store_true", help="full activation recompute")
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    args = p.parse_args()

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.runtime import parallel

    par = ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.tp > 1)
    parallel.initialize(par)
    cfg = store.read_config(args.load, par)
    cfg.language.hidden_dropout = cfg.language.attention_dropout = args.dropout
    cfg.recompute_granularity = "full" if args.recompute else None
    cfg.validate()
    model = LanguageModel(cfg)
    store.load_into(model, args.load)
    if args.drop_sp_tag:
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.sequence_parallel = False
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()

    gen = torch.Generator().manual_seed(0)
    b, s, v = 2, 16, cfg.language.vocab_size
    tokens = torch.randint(0, v, (b, s), generator=gen)
    labels = torch.randint(0, v, (b, s), generator=gen)
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    loss = ddp(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([ddp])

    grads = full_grads(model, cfg.language.gated_linear_unit)
    if dist.get_rank() == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
