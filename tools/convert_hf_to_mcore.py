"""HF Phi-2 / StableLM-2 folder -> Megatron distributed checkpoint (loads at any TP).

    python tools/convert_hf_to_mcore.py --hf-dir HF --save CKPT [--params-dtype bfloat16]
"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF folder: config.json + *.safetensors")
    p.add_argument("--save", required=True, help="Megatron checkpoint root to write")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast to this dtype (default: keep the HF tensors' dtype)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.config import ConfigError
    from medmoe_mcore.conversion.language import import_hf

    try:
        folder = import_hf(args.hf_dir, args.save, params_dtype=args.params_dtype,
                           show_progress=not args.no_progress)
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved Megatron checkpoint: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
