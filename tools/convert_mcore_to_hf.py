"""Megatron distributed checkpoint -> HF folder (safetensors + config.json [+ tokenizer]).

A multimodal checkpoint of any stage (CLIP + projector + Phi/StableLM, dense or Med-MoE)
becomes a release folder in the authors' MoE-LLaVA layout with our `transformers` classes,
tokenizer, chat template, image processor and a hub-ready model card (`--format medmoe`, the
default; `--eval-report` adds the evaluation table):

    python tools/convert_mcore_to_hf.py --load CKPT --hf-dir OUT
    # then: AutoModelForCausalLM / AutoProcessor .from_pretrained(OUT, trust_remote_code=True)

or, dense only, plain `LlavaForConditionalGeneration` (`--format llava`; Phi-2's LM-head bias
needs the explicit `--drop-lm-head-bias`). A language-model checkpoint becomes what
`AutoModelForCausalLM.from_pretrained` loads. A LoRA checkpoint (medmoe) exports merged
(`--lora-merge`) or as the base release + a PEFT adapter folder (`--peft-adapter-dir DIR`).
"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint root (or iteration folder)")
    p.add_argument("--hf-dir", required=True, help="output HF folder (written atomically)")
    p.add_argument("--format", choices=["medmoe", "llava"], default="medmoe",
                   help="multimodal checkpoints: medmoe (authors' layout + our classes, any "
                        "stage) or llava (LlavaForConditionalGeneration, dense only)")
    p.add_argument("--accept-authors-divergence", action="store_true",
                   help="medmoe: export a model the authors' code would compute differently "
                        "(named in the error); the folder's README.md then lists how")
    p.add_argument("--drop-lm-head-bias", action="store_true",
                   help="llava: drop Phi-2's LM-head bias, which LLaVA's classes lack")
    p.add_argument("--tokenizer", help="medmoe: HF tokenizer folder (default: the "
                                       "checkpoint's tokenizer/)")
    p.add_argument("--lora-merge", action="store_true",
                   help="medmoe, LoRA checkpoints: merge the adapters into the weights "
                        "(W + alpha/r B A) and export the merged model")
    p.add_argument("--peft-adapter-dir",
                   help="medmoe, LoRA checkpoints: export the base model to --hf-dir and the "
                        "adapters here as a PEFT folder (peft.PeftModel.from_pretrained(base, "
                        "DIR))")
    p.add_argument("--eval-report",
                   help="medmoe: the JSON of `tools/evaluate.py score --report`: its table "
                        "goes into the model card (README.md) and its metadata")
    p.add_argument("--card-datasets",
                   help="medmoe: the model card's datasets, comma-separated hub ids (default: "
                        "the names of the dataset folders each stage trained on)")
    p.add_argument("--license", help="medmoe: the model card's license (default: the base "
                                     "language model's: mit for Phi-2, other for StableLM 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --hf-dir")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.conversion.language import export_hf
    from medmoe_mcore.conversion.llava import export_llava
    from medmoe_mcore.conversion.release import export_release
    from medmoe_mcore.runtime import parallel

    common = dict(overwrite=args.overwrite, show_progress=not args.no_progress,
                  max_shard_bytes=args.max_shard_size_mb << 20)
    try:
        multimodal = store.read_config(args.load).vision is not None
        given = {"--format llava": args.format == "llava",
                 "--accept-authors-divergence": args.accept_authors_divergence,
                 "--drop-lm-head-bias": args.drop_lm_head_bias,
                 "--tokenizer": args.tokenizer is not None,
                 "--lora-merge": args.lora_merge,
                 "--peft-adapter-dir": args.peft_adapter_dir is not None,
                 "--eval-report": args.eval_report is not None,
                 "--card-datasets": args.card_datasets is not None,
                 "--license": args.license is not None}
        medmoe_only = {"--accept-authors-divergence", "--tokenizer", "--lora-merge",
                       "--peft-adapter-dir", "--eval-report", "--card-datasets", "--license"}
        unused = set(given) if not multimodal else \
            medmoe_only if args.format == "llava" else {"--drop-lm-head-bias"}
        refused = [flag for flag in given if given[flag] and flag in unused]
        if refused:  # a flag this export cannot honour is refused, never ignored
            kind = f"--format {args.format}" if multimodal else "language-model"
            raise ConfigError(f"{', '.join(refused)}: not used by a {kind} export")
        if store.read_config(args.load).lora is not None and \
                (not multimodal or args.format == "llava"):
            raise ConfigError(f"{args.load} holds LoRA adapters: export it with --format "
                              "medmoe (--lora-merge or --peft-adapter-dir), or merge it first "
                              "(tools/merge_lora.py)")
        parallel.initialize(ParallelConfig())
        if not multimodal:
            out, what = export_hf(args.load, args.hf_dir, **common), "language model"
        elif args.format == "llava":
            out = export_llava(args.load, args.hf_dir, drop_lm_head_bias=args.drop_lm_head_bias,
                               **common)
            what = "LlavaForConditionalGeneration"
        else:
            out = export_release(args.load, args.hf_dir,
                                 accept_divergence=args.accept_authors_divergence,
                                 tokenizer_dir=args.tokenizer, lora_merge=args.lora_merge,
                                 peft_adapter_dir=args.peft_adapter_dir,
                                 eval_report=args.eval_report, license=args.license,
                                 card_datasets=args.card_datasets.split(",")
                                 if args.card_datasets else None, **common)
            what = "Med-MoE release (authors' layout, trust_remote_code)"
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote HF {what}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
