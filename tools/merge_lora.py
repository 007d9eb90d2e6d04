"""LoRA checkpoint -> merged checkpoint (W + alpha / r x B A; no adapters), an ordinary
Megatron checkpoint that upcycling, router training, release export and every TP/EP take.

    python tools/merge_lora.py --load ckpt/stage3_lora --save ckpt/stage3_merged

tools/convert_mcore_to_hf.py --lora-merge exports the merged model directly; without it a
LoRA checkpoint exports as base release + PEFT adapter (--peft-adapter-dir).
"""

import argparse
import sys


def main(argv=None):
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.conversion.lora_merge import merge_checkpoint
    from medmoe_mcore.runtime import parallel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root with LoRA adapters")
    p.add_argument("--save", required=True, help="root of the merged checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save folder that holds a checkpoint (whole, once the new "
                        "one is complete)")
    args = p.parse_args(argv)
    try:
        parallel.initialize(ParallelConfig())
        out = merge_checkpoint(args.load, args.save, overwrite=args.overwrite)
    except (ConfigError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
