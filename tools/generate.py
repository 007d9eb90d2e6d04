"""Ask a trained Med-MoE questions about images (any stage, dense or MoE), at any TP/EP/DP.

    python tools/generate.py --load CKPT --image chest.dcm --question "What modality is this?"
    torchrun --nproc_per_node 4 tools/generate.py --load CKPT --questions q.jsonl \\
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2
    python tools/generate.py --hf-dir EXPORT --image x.png --question "..."   # a release folder

Images: PNG/JPEG/... or DICOM (windowed by the file, or --dicom-window; data/dicom.py). A
question file is JSON lines with `question` (or `text`),
`image` (relative to --image-folder, default the file's folder) and optional `id`. Rank 0
prints one JSON line per question in input order (`id`, `question`, `image`, `answer`,
`tokens`), also written to --output when given.
"""

import argparse
import json
import sys


def parser() -> argparse.ArgumentParser:
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.data import dicom
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.training.arguments import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="Megatron checkpoint (any stage) root or iteration folder")
    source.add_argument("--hf-dir", help="an HF release folder (tools/convert_mcore_to_hf.py), "
                                         "converted on the fly into a temporary checkpoint "
                                         "(every rank must see $TMPDIR: one node, or a "
                                         "shared filesystem)")
    asked = p.add_mutually_exclusive_group(required=True)
    asked.add_argument("--question", help="one question (with --image)")
    asked.add_argument("--questions", help="JSON lines: question/text, image, optional id")
    p.add_argument("--image", help="the image of --question (PNG/JPEG/DICOM; without it a "
                                   "text-only question)")
    p.add_argument("--image-folder", help="where --questions' image paths are relative to")
    p.add_argument("--output", help="also write the answers here (JSON lines)")
    dicom.add_arguments(p, one_frame=True)
    add_config_arguments(p, GenerationConfig, "generation")
    add_config_arguments(p, ParallelConfig, "parallelism")
    return p


def _questions(args):
    from pathlib import Path

    import dataclasses

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.data import dicom
    from medmoe_mcore.inference.questions import Question, read_questions

    try:
        options = dicom.options_of(args, one_frame=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.questions:
        return [dataclasses.replace(q, dicom=options)
                for q in read_questions(args.questions, args.image_folder)]
    if args.image is not None and not Path(args.image).is_file():
        raise ConfigError(f"--image {args.image}: not found")
    return [Question(0, 0, args.question, args.image, dicom=options)]


def main(argv=None):
    args = parser().parse_args(argv)
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.data.images import ImageDecodeError
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import load_asked_model
    from medmoe_mcore.inference.questions import answer
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.arguments import given

    own_groups = not parallel.started()  # an in-process caller keeps its own
    try:
        gen = GenerationConfig(**given(args, GenerationConfig)).validate()
        par = ParallelConfig(**given(args, ParallelConfig))
        questions = _questions(args)  # every input checked before any model is built
        model, cfg, tok = load_asked_model(args.load, args.hf_dir, par, gen,
                                           make_groups=parallel.initialize)
        parallel.log(f"{len(questions)} question(s); model: {cfg.language.family}, "
                     f"{'Med-MoE' if cfg.moe else 'dense'}; TP={par.tensor_model_parallel_size}"
                     f"{'+SP' if par.sequence_parallel else ''}, "
                     f"EP={par.expert_model_parallel_size}")
        results = answer(model, questions, tok, gen)
    except (ConfigError, ConversionError, ImageDecodeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.finish(tear_down=own_groups)
    if results is None:
        return 0
    lines = [json.dumps({k: r[k] for k in ("id", "question", "image", "answer", "tokens")})
             for r in results]
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
