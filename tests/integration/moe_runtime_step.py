"""CPU-runtime check on Megatron-Core's own MoE path, run under torchrun.

A StableLM-shaped GPTModel whose MLPs are Megatron MoE layers (4 experts, top-2, shared expert,
alltoall dispatcher), wrapped in Megatron DDP with the Megatron optimizer (grad clipping on):
loss, one optimizer step, loss again. `--save` writes the initial weights (dist_checkpointing)
and `--load` reads them at another TP/EP, so layouts can be compared. Rank 0 writes both
losses to --out.
"""

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ModelConfig, ParallelConfig
    from medmoe_mcore.models.specs.backends import LOCAL
    from medmoe_mcore.models.specs.language import language_layer_spec
    from medmoe_mcore.models.transformer_config import language_transformer_config
    from medmoe_mcore.runtime import parallel

    par = ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.tp > 1,
                         expert_model_parallel_size=args.ep)
    dense = ModelConfig(language=language_flavor("tiny_stablelm"),
                        parallel=dataclasses.replace(par, expert_model_parallel_size=1)).validate()
    parallel.initialize(par, seed=7)
    lm = dense.language
    config = dataclasses.replace(
        language_transformer_config(dense), expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=1, num_moe_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=lm.ffn_hidden_size, moe_token_dispatcher_type="alltoall",
        moe_shared_expert_intermediate_size=lm.ffn_hidden_size,
        moe_router_load_balancing_type="none", moe_router_dtype="fp32")
    moe = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=4)
    layer = language_layer_spec(lm, LOCAL, mlp=moe)
    model = GPTModel(config, TransformerBlockSubmodules([layer] * lm.num_layers, LOCAL.norm),
                     vocab_size=lm.padded_vocab_size, max_sequence_length=64,
                     position_embedding_type="rope", rotary_percent=lm.rotary_percent)
    if args.save:
        if dist.get_rank() == 0:
            os.makedirs(args.save, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), args.save)
    if args.load:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.load))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.1,
                                                 params_dtype=torch.float32), [ddp])

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, lm.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, lm.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    losses = []
    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        ok, grad_norm, _ = opt.step()
        assert ok, "optimizer step skipped"
        losses.append(loss.item())
    if dist.get_rank() == 0:
        torch.save({"losses": torch.tensor(losses), "grad_norm": float(grad_norm)}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
