"""A StableLM Med-MoE with LoRA adapters (gated fc1: B's gate and up halves) through
checkpoints at changing layouts:

    python lora_reshard.py init 1 1 - A            # random model at TP1, saved to A
    torchrun ... lora_reshard.py load TP EP A B    # loaded at TP (+SP) x EP, saved to B
    python lora_reshard.py compare 1 1 A B         # prints IDENTICAL: every tensor bitwise
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.runtime import parallel

    mode, tp, ep, src, dst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
    par = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                         expert_model_parallel_size=ep)
    parallel.initialize(par, seed=3)

    def loaded(root):
        model = LanguageModel(store.read_config(root, par))
        store.load_into(model, root)
        return model

    if mode == "init":
        moe = MoEConfig(num_experts=2, router_topk=1)
        cfg = ModelConfig(language=language_flavor("tiny_stablelm"), parallel=par, moe=moe,
                          lora=LoRAConfig(rank=4).resolve_targets(moe)).validate()
        model = LanguageModel(cfg)
        with torch.no_grad():  # B is 0 at init: make every factor non-trivial
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        store.save(model.sharded_state_dict(), dst, cfg)
    elif mode == "load":
        store.save(loaded(src).sharded_state_dict(), dst,
                           store.read_config(src, par))
    else:
        a, b = loaded(src).state_dict(), loaded(dst).state_dict()
        bad = [k for k in a if "_extra" not in k and not torch.equal(a[k], b[k])]
        print(f"MISMATCH {bad[:5]} ({len(bad)})" if bad else f"IDENTICAL {len(a)}")


if __name__ == "__main__":
    main()
