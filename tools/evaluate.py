"""Med-VQA / MedMNIST evaluation: predictions from a checkpoint, scored by question id.

    torchrun --nproc_per_node 4 tools/evaluate.py generate --load CKPT --data test.json \
        --image-folder images/ --output predictions.jsonl --expert-stats stats/ \
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2
    python tools/evaluate.py score --gold test.json --predictions answers.jsonl [--report r.json]

`generate`: one prediction per question (greedy; DP-sharded, gathered in file order) from a
checkpoint (--load) or a release folder (--hf-dir); test data as a LLaVA-format JSON / JSON
lines file (+ --image-folder; no image outside it is read) or shards of
tools/prepare_data.py. The prompt is the record's question + the --prompt-style line of its
answer type (`authors`: the question as written, as their model_vqa_med.py). The output also
serves as `--gold` (it carries the answers). `--expert-stats DIR`: expert_activation.csv and
.png, the tokens each MoE layer routed to each expert while answering, by modality and by
image / text token.

Gold: LLaVA-format test records (`id`, `conversations`, `answer_type`, optional `modality`,
`dataset`). Predictions: JSON lines with `id` + `prediction` (ours) or `question_id` + `text`
(the authors' / LLaVA's answer files). A missing, duplicate or unknown id stops the run with
the ids named; `--allow-missing` scores what is there and reports how many were missing.
Metrics: LLaVA-Med's definitions (eval/metrics.py). Prints a table per dataset x answer type x
modality, then as the last line one JSON object (percentages 0-100).

MedMNIST records (with `labels`) are scored as classification (eval/classification.py).
"""

import argparse
import json
import sys
import time


def main(argv=None):
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.eval.predict import PROMPT_STYLES
    from medmoe_mcore.data import dicom
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.training.arguments import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("score", help="score predictions against gold answers")
    s.add_argument("--gold", required=True, help="LLaVA-format test JSON / JSON lines")
    s.add_argument("--predictions", required=True, help="JSON lines: id + prediction, or "
                                                        "question_id + text")
    s.add_argument("--allow-missing", action="store_true",
                   help="score the questions that have a prediction; report the others")
    s.add_argument("--report", help="also write the full report (JSON) here")
    g = modes.add_parser("generate", help="predict an answer for every test question")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="Megatron checkpoint (any stage)")
    source.add_argument("--hf-dir", help="a release folder (tools/convert_mcore_to_hf.py), "
                                         "converted on the fly into a temporary checkpoint")
    g.add_argument("--data", required=True, help="LLaVA-format test JSON / JSON lines, or a "
                                                 "shard folder / .tar")
    g.add_argument("--image-folder", help="image paths are relative to this (default: the "
                                          "data file's folder)")
    g.add_argument("--output", required=True, help="predictions (JSON lines)")
    g.add_argument("--prompt-style", default="authors", choices=sorted(PROMPT_STYLES),
                   help="the line after each question, by answer type (default: authors)")
    g.add_argument("--expert-stats", metavar="DIR", help="MoE models: write the expert "
                   "activation (CSV + heatmap PNG) of the answers here")
    dicom.add_arguments(g, one_frame=True)
    add_config_arguments(g, GenerationConfig, "generation")
    add_config_arguments(g, ParallelConfig, "parallelism")
    args = p.parse_args(argv)
    return generate(args) if args.mode == "generate" else score(args)


def score(args) -> int:
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.eval.scoring import evaluate_predictions, headline, table

    try:
        report = evaluate_predictions(args.gold, args.predictions, args.allow_missing)
    except (ConfigError, OSError) as e:  # OSError names its file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if report["unreadable_predictions"]:
        print(f"unreadable prediction records left out (--allow-missing), by reason: "
              f"{report['unreadable_predictions']}")
    if report["num_missing"]:
        print(f"{report['num_missing']} question(s) without a prediction were left out")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(headline(report)))
    return 0


def generate(args) -> int:
    import dataclasses

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.data import dicom
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.data.images import ImageDecodeError
    from medmoe_mcore.eval.predict import predict, test_questions
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import load_asked_model
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.arguments import given

    own_groups = not parallel.started()  # an in-process caller keeps its own
    try:
        gen = GenerationConfig(**given(args, GenerationConfig)).validate()
        par = ParallelConfig(**given(args, ParallelConfig))
        try:
            options = dicom.options_of(args, one_frame=True)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        questions, gold = test_questions(args.data, args.image_folder, args.prompt_style)
        questions = [dataclasses.replace(q, dicom=options) for q in questions]
        model, cfg, tok = load_asked_model(args.load, args.hf_dir, par, gen,
                                           make_groups=parallel.initialize)
        if args.expert_stats and cfg.moe is None:
            raise ConfigError(f"--expert-stats: {args.load or args.hf_dir} is a dense model "
                              "(no experts)")
        start = time.perf_counter()
        answers = predict(model, questions, gold, tok, gen, args.output, args.expert_stats,
                          show=lambda done, total: parallel.log(
                              f"micro-batch {done}/{total} "
                              f"({time.perf_counter() - start:.1f} s)"))
        seconds = time.perf_counter() - start
    except (ConfigError, ConversionError, ImageDecodeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.finish(tear_down=own_groups)
    if answers is not None:
        print(f"wrote {len(answers)} predictions: {args.output} ({seconds:.1f} s generating, "
              f"{len(answers) / seconds:.2f} questions/s)")
        if args.expert_stats:
            print(f"expert activation: {args.expert_stats}/expert_activation.csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
