"""Med-VQA / MedMNIST evaluation: predictions from a checkpoint, scored by question id.

    torchrun --nproc_per_node 4 tools/evaluate.py generate --load CKPT --data test.json \
        --image-folder images/ --output predictions.jsonl --tensor-model-parallel-size 2 ...
    python tools/evaluate.py score --gold test.json --predictions answers.jsonl [--report r.json]

`generate`: one prediction per question (greedy; DP-sharded, gathered in file order), the
record's own question as prompt; the output also serves as `--gold` (it carries the answers).

Gold: LLaVA-format test records (`id`, `conversations`, `answer_type`, optional `modality`,
`dataset`). Predictions: JSON lines with `id` + `prediction` (ours) or `question_id` + `text`
(the authors' / LLaVA's answer files). A missing, duplicate or unknown id stops the run with
the ids named; `--allow-missing` scores what is there and reports how many were missing.
Metrics: LLaVA-Med's definitions (eval/metrics.py). Prints a table per dataset x answer type x
modality, then as the last line one JSON object (percentages 0-100).

MedMNIST records (with `labels`) are scored as classification (eval/classification.py).
Not yet here (issue 12, next): `generate --hf-dir`, --expert-stats.
"""

import argparse
import json
import sys
import time


def main(argv=None):
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
    g.add_argument("--load", required=True, help="Megatron checkpoint (any stage)")
    g.add_argument("--data", required=True, help="LLaVA-format test JSON / JSON lines")
    g.add_argument("--image-folder", help="image paths are relative to this (default: the "
                                          "data file's folder)")
    g.add_argument("--output", required=True, help="predictions (JSON lines)")
    from medmoe_mcore.config import ParallelConfig
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.training.arguments import add_config_arguments

    add_config_arguments(g, GenerationConfig, "generation")
    add_config_arguments(g, ParallelConfig, "parallelism")
    args = p.parse_args(argv)
    if args.mode == "generate":
        return generate(args)

    from medmoe_mcore.config import ConfigError
    from medmoe_mcore.eval.scoring import gold_items, join, prediction_items, score, table

    try:
        joined, missing = join(gold_items(args.gold), prediction_items(args.predictions),
                               args.allow_missing)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {**score(joined), "num_missing": len(missing), "missing_ids": missing}
    print(table(report))
    if missing:
        print(f"{len(missing)} question(s) without a prediction were left out")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("groups", "missing_ids")}))
    return 0


def generate(args) -> int:
    from medmoe_mcore import checkpointing
    from medmoe_mcore.config import ConfigError, ParallelConfig
    from medmoe_mcore.data.images import ImageDecodeError
    from medmoe_mcore.data.tokenizer import Tokenizer
    from medmoe_mcore.eval.predict import test_questions, write_predictions
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import load_for_inference
    from medmoe_mcore.inference.questions import answer
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.arguments import given

    try:
        gen = GenerationConfig(**given(args, GenerationConfig)).validate()
        par = ParallelConfig(**given(args, ParallelConfig))
        questions, gold = test_questions(args.data, args.image_folder)  # before any model
        folder = checkpointing.resolve(args.load)
        tok = Tokenizer(gen.tokenizer or folder / checkpointing.TOKENIZER)
        parallel.initialize(par, seed=gen.seed)
        model, _ = load_for_inference(folder, par, bf16=gen.bf16)
        start = time.perf_counter()
        answers = answer(model, questions, tok, gen, show=lambda done, total: parallel.log(
            f"micro-batch {done}/{total} ({time.perf_counter() - start:.1f} s)"))
        seconds = time.perf_counter() - start
    except (ConfigError, ImageDecodeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if answers is not None:
        write_predictions(answers, gold, args.output)
        print(f"wrote {len(answers)} predictions: {args.output} ({seconds:.1f} s generating, "
              f"{len(answers) / seconds:.2f} questions/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
