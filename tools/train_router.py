"""Train the Med-MoE modality router from a dense (stage-2) checkpoint and labelled records.

    python tools/train_router.py --load DENSE --records router.jsonl --out router.safetensors

Records (JSON lines or a JSON list): `modality` plus the question, as LLaVA `conversations`
(first human turn) or a `text` field. The prompt is the conversation template up to
`ASSISTANT:` (no answer), as the authors did. Prints per-class and overall accuracy and the
silhouette score of the router outputs on a held-out split; writes the router file (modality
names sorted: index = expert).
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def read_records(path):
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def question_of(record):
    turns = record.get("conversations") or record.get("conversatons")  # authors' typo
    if turns:
        human = [t.get("value", "") for t in turns if t.get("from") == "human"]
        return human[0] if human else None
    return record.get("text")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="HF tokenizer folder (default: the checkpoint's)")
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from medmoe_mcore import checkpointing
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.router import file as router_file
    from medmoe_mcore.config import ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.router.training import evaluate, fit_router, pooled_features

    folder = checkpointing.resolve(args.load)
    tok_dir = args.tokenizer or folder / checkpointing.TOKENIZER
    if not Path(tok_dir).is_dir():
        print(f"error: no tokenizer: {tok_dir} is not a folder (pass --tokenizer)",
              file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    skipped, prompts, names = Counter(), [], []
    for record in read_records(args.records):
        question = question_of(record)
        if not record.get("modality"):
            skipped["no modality"] += 1
        elif not question:
            skipped["no question"] += 1
        else:
            prompts.append(f"{SYSTEM} USER: {question} ASSISTANT:")
            names.append(record["modality"])
    if skipped:
        print(f"skipped records: {dict(skipped)}")
    modalities = sorted(set(names))
    if len(modalities) < 2:
        print(f"error: need at least 2 modalities, found {modalities}", file=sys.stderr)
        return 2
    labels = torch.tensor([modalities.index(n) for n in names])

    cfg = checkpointing.read_config(folder, ParallelConfig())
    parallel.initialize(cfg.parallel, seed=args.seed)
    model = LanguageModel(cfg, perform_initialization=False, parallel_output=False)
    checkpointing.load_into(model, folder)
    vocab = cfg.language.vocab_size
    ids = [[t for t in tokenizer(text)["input_ids"] if t < vocab] for text in prompts]
    features = pooled_features(model, ids)

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    n_test = max(len(modalities), int(len(labels) * args.held_out_fraction))
    test, train = order[:n_test], order[n_test:]
    router = fit_router(features[train], labels[train], modalities, epochs=args.epochs,
                        lr=args.lr, seed=args.seed)
    report = evaluate(router, features[test], labels[test])
    for name, acc in report["per_class"].items():
        print(f"  {name:>16}: held-out accuracy {acc:.3f}")
    print(f"router held-out accuracy {report['accuracy']:.3f} (chance {1 / len(modalities):.3f})"
          f", silhouette {report['silhouette']:.3f}, train {len(train)} / held-out {len(test)}")
    router_file.save(router, args.out)
    print(f"router file: {args.out} (experts = {modalities})")
    print(json.dumps({"accuracy": report["accuracy"], "silhouette": report["silhouette"],
                      "modalities": modalities}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
