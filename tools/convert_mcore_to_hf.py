"""Megatron distributed checkpoint -> HF folder (safetensors + config.json [+ tokenizer]).

A language model becomes what `AutoModelForCausalLM.from_pretrained` loads; a multimodal
(CLIP + projector + language model) checkpoint becomes `LlavaForConditionalGeneration`.

    python tools/convert_mcore_to_hf.py --load CKPT --hf-dir OUT
"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint root (or iteration folder)")
    p.add_argument("--hf-dir", required=True, help="output HF folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --hf-dir")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore import checkpointing
    from medmoe_mcore.config import ConfigError, ParallelConfig
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.conversion.language import export_hf
    from medmoe_mcore.conversion.llava import export_llava

    try:
        parallel.initialize(ParallelConfig())
        multimodal = checkpointing.read_config(args.load).vision is not None
        export = export_llava if multimodal else export_hf
        out = export(args.load, args.hf_dir, overwrite=args.overwrite,
                     show_progress=not args.no_progress,
                     max_shard_bytes=args.max_shard_size_mb << 20)
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote HF {'LLaVA' if multimodal else 'language'} model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
