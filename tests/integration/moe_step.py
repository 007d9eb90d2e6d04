"""Forward + backward of tiny Med-MoE language models under torchrun, for layout parity.

    python moe_step.py --init ROOT              # TP1/EP1: make one checkpoint per variant
    torchrun ... moe_step.py --load ROOT --tp 2 --ep 2 --out OUT

Each rank writes OUT.rank{r}.pt with, per variant, the data-parallel mean loss and the
gradients it holds in the single-rank layout (TP-gathered, global expert ids).
"""

import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gather import full_grads  # noqa: E402

# name: (flavor, MoEConfig fields[, LoRAConfig fields: adapters only train, as in stage 3])
VARIANTS = {
    "phi_e4_top2_token": ("tiny", dict(num_experts=4, router_topk=2)),
    "stablelm_e4_top1_sample": ("tiny_stablelm", dict(num_experts=4, router_topk=1,
                                                      routing_granularity="sample")),
    "phi_e6_top2_sample": ("tiny", dict(num_experts=6, router_topk=2,
                                        routing_granularity="sample", layer_freq=[1, 0, 0, 1])),
    "stablelm_e2_top1_token": ("tiny_stablelm", dict(num_experts=2, router_topk=1)),
    "phi_e4_top1_allgather": ("tiny", dict(num_experts=4, router_topk=1,
                                           token_dispatcher="allgather", renormalize=True)),
    "phi_e4_learned_top2": ("tiny", dict(num_experts=4, router_topk=2, router_type="learned",
                                         renormalize=True, aux_loss_coeff=0.01)),
    "phi_e4_top2_lora": ("tiny", dict(num_experts=4, router_topk=2),
                         dict(rank=4, alpha=12.0, dropout=0.0)),
    "stablelm_e2_top1_lora": ("tiny_stablelm", dict(num_experts=2, router_topk=1),
                              dict(rank=4, dropout=0.0)),
}
GLOBAL_BATCH, SEQ = 4, 16


def build(cfg, init: bool):
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.training.freezing import apply_stage

    model = LanguageModel(cfg)
    if init:  # non-trivial routing and biases (Megatron initialises biases and router to 0;
        # LoRA's B to 0)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                scale = 2.0 if "router" in name else 0.02
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    if cfg.lora is not None:
        apply_stage(model, 3, lora=True)
    return model


def step(model, cfg):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.language.vocab_size
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
    tokens, labels = tokens[rows], labels[rows]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    loss = ddp(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
    return mean / dp, full_grads(model, cfg.language.gated_linear_unit)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--init")
    p.add_argument("--load")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--moe-grouped-gemm", action="store_true", help="the grouped experts")
    args = p.parse_args()

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.runtime import parallel

    par = ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.tp > 1,
                         expert_model_parallel_size=args.ep,
                         moe_grouped_gemm=args.moe_grouped_gemm)
    parallel.initialize(par, seed=3)
    results = {}
    for name in args.variants.split(","):
        flavor, fields, *lora = VARIANTS[name]
        if args.init:
            moe = MoEConfig(**fields)
            cfg = ModelConfig(language=language_flavor(flavor), parallel=par, moe=moe,
                              lora=LoRAConfig(**lora[0]).resolve_targets(moe) if lora
                              else None).validate()
            model = build(cfg, init=True)
            store.save(model.sharded_state_dict(), os.path.join(args.init, name), cfg)
        else:
            cfg = store.read_config(os.path.join(args.load, name), par).validate()
            model = build(cfg, init=False)
            store.load_into(model, os.path.join(args.load, name))
        loss, grads = step(model, cfg)
        results[name] = {"loss": loss, "grads": grads,
                         "moe": dataclasses.asdict(cfg.moe)}
    torch.save(results, f"{args.out}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
