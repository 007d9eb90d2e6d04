"""Score Med-VQA predictions against gold answers, joined by question id.

    python tools/evaluate.py score --gold test.json --predictions answers.jsonl [--report r.json]

Gold: LLaVA-format test records (`id`, `conversations`, `answer_type`, optional `modality`,
`dataset`). Predictions: JSON lines with `id` + `prediction` (ours) or `question_id` + `text`
(the authors' / LLaVA's answer files). A missing, duplicate or unknown id stops the run with
the ids named; `--allow-missing` scores what is there and reports how many were missing.
Metrics: LLaVA-Med's definitions (eval/metrics.py). Prints a table per dataset x answer type x
modality, then as the last line one JSON object (percentages 0-100).

MedMNIST records (with `labels`) are scored as classification (eval/classification.py).
Not yet here (issue 12, next): `generate` mode, --expert-stats.
"""

import argparse
import json
import sys


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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
