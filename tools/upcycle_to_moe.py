"""Dense (stage-2) checkpoint -> Med-MoE (stage-3) checkpoint: experts and meta expert start as
copies of each MoE layer's dense FFN; the modality router comes from --router.

    python tools/upcycle_to_moe.py --load DENSE --router ROUTER.safetensors \\
        --num-experts 4 --moe-router-topk 1 --save MOE

Without --router the learned-router baseline is built (Megatron's TopKRouter, initialised as
Megatron does; MoE-LLaVA's settings: top-2 renormalised, aux loss 0.01 unless given).
"""

import argparse
import sys


def layer_freq(text: str):
    """'2' -> 2; '[1,0,1,0]' or '1,0,1,0' -> list (Megatron's --moe-layer-freq)."""
    text = text.strip().strip("[]")
    return int(text) if "," not in text else [int(x) for x in text.split(",")]


def moe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-type", choices=["modality", "learned"], default=None,
                   help="default: modality with --router, learned without")
    p.add_argument("--moe-router-topk", type=int, default=None,
                   help="default 1 (modality router, authors' release) or 2 (learned)")
    p.add_argument("--moe-layer-freq", type=layer_freq, default=2)
    p.add_argument("--moe-routing-granularity", choices=["token", "sample"], default="token")
    p.add_argument("--moe-router-renormalize", action="store_true", default=None)
    p.add_argument("--moe-aux-loss-coeff", type=float, default=None)
    p.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"],
                   default="alltoall")


def moe_config(args, learned: bool):
    from medmoe_mcore.config import MoEConfig

    return MoEConfig(
        num_experts=args.num_experts,
        router_topk=args.moe_router_topk or (2 if learned else 1),
        layer_freq=args.moe_layer_freq,
        router_type="learned" if learned else "modality",
        routing_granularity=args.moe_routing_granularity,
        renormalize=args.moe_router_renormalize if args.moe_router_renormalize is not None
        else learned,
        aux_loss_coeff=args.moe_aux_loss_coeff if args.moe_aux_loss_coeff is not None
        else (0.01 if learned else 0.0),
        token_dispatcher=args.moe_token_dispatcher_type,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="dense checkpoint root")
    p.add_argument("--save", required=True, help="MoE checkpoint root")
    p.add_argument("--router", help="router file (tools/train_router.py or "
                                    "tools/import_authors_router.py)")
    moe_arguments(p)
    args = p.parse_args(argv)

    from medmoe_mcore.config import ConfigError
    from medmoe_mcore.conversion.upcycle import upcycle

    try:
        learned = (args.moe_router_type or ("modality" if args.router else "learned")) == "learned"
        moe = moe_config(args, learned=learned)
        out = upcycle(args.load, args.save, moe, args.router)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MoE checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
