"""HF folder(s) -> Megatron distributed checkpoint (loads at any TP/EP).

    # a language model (Phi-2 / StableLM-2, or a Med-MoE export)
    python tools/convert_hf_to_mcore.py --hf-dir PHI2 --save CKPT
    # a multimodal model: HF LlavaForConditionalGeneration or the authors' MoE-LLaVA layout
    python tools/convert_hf_to_mcore.py --hf-dir LLAVA --save CKPT
    # stage 1's start from public parts: CLIP + language model, projector fresh (or --projector)
    python tools/convert_hf_to_mcore.py --hf-dir PHI2 --vision-hf-dir CLIP --save CKPT
    # a release folder + the PEFT adapter exported beside it: a LoRA checkpoint
    python tools/convert_hf_to_mcore.py --hf-dir RELEASE --peft-adapter-dir ADAPTER --save CKPT
"""

import argparse
import sys


def main(argv=None):
    from medmoe_mcore.conventions import DEFAULT_SEED, IMAGE_SENTINEL_ID

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF folder: config.json + *.safetensors or "
                   "pytorch_model*.bin (read with weights_only=True); or a Hugging Face cache "
                   "entry (models--org--name: the snapshot refs/main names) or snapshot")
    p.add_argument("--save", required=True, help="Megatron checkpoint root to write")
    p.add_argument("--vision-hf-dir",
                   help="CLIP folder (CLIPVisionModel or CLIPModel): with a language --hf-dir, "
                        "assemble the multimodal model; with the authors' layout, the CLIP "
                        "config (default: the built-in CLIP ViT-L/14-336)")
    p.add_argument("--projector", help="projector safetensors (LLaVA or mm_projector names); "
                                       "default: freshly initialised")
    p.add_argument("--image-token-id", type=int, default=IMAGE_SENTINEL_ID,
                   help="the <image> placeholder id: a vocabulary token, or a negative sentinel "
                        f"like the authors' {IMAGE_SENTINEL_ID} (default)")
    p.add_argument("--vision-feature-layer", type=int, default=-2)
    p.add_argument("--no-lm-head-bias", action="store_true",
                   help="drop Phi-2's LM-head bias when assembling (as the authors' LlavaPhi; "
                        "needed for an HF LLaVA export)")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast to this dtype (default: keep the HF tensors' dtype)")
    p.add_argument("--peft-adapter-dir",
                   help="multimodal --hf-dir: a PEFT LoRA adapter folder on top of it "
                        "(tools/convert_mcore_to_hf.py --peft-adapter-dir): the checkpoint "
                        "gets the adapters")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of a fresh projector")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save folder that holds a checkpoint (a training run "
                        "included) whole, once the new one is complete; without it such a "
                        "folder is refused")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import without the folder's tokenizer (by default it must be present, "
                        "readable and fit the embedding); later steps then take --tokenizer")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.conversion.assemble import assemble
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.conversion.hf_files import NO_TOKENIZER
    from medmoe_mcore.conversion.language import import_hf
    from medmoe_mcore.conversion.llava import import_multimodal, is_multimodal
    from medmoe_mcore.runtime import parallel

    report = []
    progress = not args.no_progress
    try:
        store.check_can_release(args.save, args.overwrite)  # before any work
        multimodal = is_multimodal(args.hf_dir)
        if args.peft_adapter_dir and not multimodal:
            raise ConfigError("--peft-adapter-dir: needs a multimodal --hf-dir (a release "
                              "folder)")
        parallel.initialize(ParallelConfig(), seed=args.seed)
        if multimodal:
            folder = import_multimodal(args.hf_dir, args.save, params_dtype=args.params_dtype,
                                       vision_hf_dir=args.vision_hf_dir, show_progress=progress,
                                       report=report, overwrite=args.overwrite,
                                       peft_adapter_dir=args.peft_adapter_dir,
                                       tokenizer=not args.no_tokenizer)
        elif args.vision_hf_dir:
            folder = assemble(args.vision_hf_dir, args.hf_dir, args.save,
                              projector_path=args.projector, image_token_id=args.image_token_id,
                              vision_feature_layer=args.vision_feature_layer,
                              params_dtype=args.params_dtype,
                              lm_head_bias=not args.no_lm_head_bias, seed=args.seed,
                              show_progress=progress, report=report,
                              overwrite=args.overwrite, tokenizer=not args.no_tokenizer)
        else:
            folder = import_hf(args.hf_dir, args.save, params_dtype=args.params_dtype,
                               show_progress=progress, overwrite=args.overwrite,
                               tokenizer=not args.no_tokenizer)
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_tokenizer:
        report.append(NO_TOKENIZER)
    for line in report:
        print(f"  {line}")
    print(f"saved Megatron checkpoint: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
