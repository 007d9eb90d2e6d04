"""Dense (stage-2) checkpoint -> Med-MoE (stage-3) checkpoint: experts and meta expert start as
copies of each MoE layer's dense FFN; the modality router comes from --router.

    python tools/upcycle_to_moe.py --load DENSE --router ROUTER.safetensors \\
        --num-experts 4 --moe-router-topk 1 --save MOE

Without --router the learned-router baseline is built (Megatron's TopKRouter, initialised as
Megatron does; MoE-LLaVA's settings: top-2 renormalised, aux loss 0.01 unless given). The MoE
flags are the same as examples/pretrain_medmoe.py's (generated from MoEConfig).
"""

import argparse
import sys


def main(argv=None):
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.config.model import MoEConfig, ParallelConfig
    from medmoe_mcore.conventions import DEFAULT_SEED
    from medmoe_mcore.conversion.upcycle import upcycle
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.arguments import add_config_arguments, given, moe_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="dense checkpoint root")
    p.add_argument("--save", required=True, help="MoE checkpoint root")
    p.add_argument("--router", help="router file (tools/train_router.py or "
                                    "tools/import_authors_router.py)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of a learned router's init")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save folder that holds a checkpoint (whole, once the new "
                        "one is complete)")
    add_config_arguments(p, MoEConfig, "Med-MoE layers")
    args = p.parse_args(argv)
    try:
        moe = moe_config(given(args, MoEConfig), router_file=args.router is not None)
        parallel.initialize(ParallelConfig(), seed=args.seed)
        out = upcycle(args.load, args.save, moe, args.router, overwrite=args.overwrite)
    except (ConfigError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MoE checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
