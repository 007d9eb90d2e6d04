"""Three optimizer steps of a tiny Med-MoE language model (2 micro-batches each, DP = world
size) through training/setup.py's DDP and optimizer, once per overlap variant, from the same
initial weights and data. Rank 0 writes, per variant, every parameter's gradient after the
first step (the DDP buffer, where each rank holds all of it) and every parameter after the
last step (made current on every rank first) to --out.

    torchrun --nproc_per_node 2 tests/integration/overlap_step.py --out OUT.pt
"""

import argparse

import torch
import torch.distributed as dist

VARIANTS = {
    "plain": {},
    "overlap_grad_reduce": dict(overlap_grad_reduce=True, ddp_bucket_size=4000),
    "distributed_optimizer": dict(use_distributed_optimizer=True),
    "distributed_optimizer_overlap": dict(use_distributed_optimizer=True,
                                          overlap_grad_reduce=True, overlap_param_gather=True,
                                          ddp_bucket_size=4000),
}
MICRO, MICRO_BATCH, SEQ = 2, 2, 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.setup import params_in_sync, wrap

    par = ParallelConfig()
    parallel.initialize(par, seed=3)
    cfg = ModelConfig(language=language_flavor("tiny"), parallel=par,
                      moe=MoEConfig(num_experts=4, router_topk=2, router_type="learned",
                                    renormalize=True)).validate()
    initial = {k: v.clone() for k, v in LanguageModel(cfg).state_dict().items()
               if not k.endswith("_extra_state")}
    dp, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.language.vocab_size
    data = torch.randint(0, vocab, (3, MICRO, MICRO_BATCH * dp, SEQ), generator=gen)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
    results = {}
    for name, flags in VARIANTS.items():
        model = LanguageModel(cfg)
        model.load_state_dict(initial, strict=False)
        # Adam's eps well above float32 noise: the key bias's gradient is analytically zero
        # (softmax ignores it) and holds rounding noise (~1e-12), which eps = 1e-8 would turn
        # into updates of ~1e-6 that differ with any summation order (the comparison's subject).
        train = TrainConfig(stage=3, data_path=["-"], pretrained_checkpoint="-", train_iters=3,
                            lr=1e-2, min_lr=1e-3, adam_eps=1e-5,
                            **flags).validate(dp=dp)
        setup = wrap(model, [n for n, _ in model.named_parameters()], cfg, train)

        def forward_step(data_iterator, ddp):
            tokens = next(data_iterator)
            loss = ddp(tokens, positions, None, labels=tokens)
            return loss, lambda out: (out.float().mean(), {"lm loss": out.float().mean()})

        grads = None
        for step in range(3):
            setup.ddp.zero_grad_buffer()
            setup.optimizer.zero_grad()
            mine = [data[step, m, rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
                    for m in range(MICRO)]
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(mine), model=[setup.ddp],
                num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                forward_only=False)
            if step == 0 and not train.use_distributed_optimizer:
                grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
            setup.optimizer.step()
            setup.scheduler.step(increment=1)
        with params_in_sync(setup.ddp):
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[name] = {"grads": grads, "weights": weights}
        del setup, model
    assert parallel_state.get_data_parallel_world_size() == dp
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
