"""Train the Med-MoE modality router from a dense (stage-2) checkpoint and labelled records,
with the one recipe of medmoe_mcore/router/training.py (the demo pipeline uses it too).

    python tools/train_router.py --load DENSE --records router.jsonl --out router.safetensors
    python tools/train_router.py --load DENSE --data-path SHARDS --out router.safetensors

Records carry `modality` plus the question as LLaVA `conversations` (first human turn):
JSON lines or a JSON list (images from --image-folder when the model has a vision tower), or
prepare_data shards (images inside). The prompt is the conversation template up to
`ASSISTANT:` (no answer). `--num-experts E` trains a router for E experts whatever the number
of modalities (sub-domains or groups of modalities, recorded in the file). Prints per-class and overall accuracy and the silhouette score of the
router outputs on a held-out split; writes the router file (modality names sorted: index =
expert).
"""

import argparse
import json
import sys
from pathlib import Path


def _records(args):
    """(record, image bytes or None) pairs from --records (+ --image-folder) or --data-path."""
    from medmoe_mcore.data.records import load_json_records, read_shards, shard_paths

    if args.data_path:
        return list(read_shards(shard_paths(args.data_path)))
    folder = Path(args.image_folder) if args.image_folder else None
    out = []
    for record in load_json_records(args.records):
        image = None
        if folder is not None and isinstance(record.get("image"), str):
            path = (folder / record["image"]).resolve()
            # never read outside the given folder
            if folder.resolve() in path.parents and path.is_file():
                image = path.read_bytes()
        out.append((record, image))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="dense (stage-2) checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="JSON / JSONL records with `modality`")
    source.add_argument("--data-path", help="prepare_data shards with `modality`")
    p.add_argument("--image-folder", help="images of --records (multimodal checkpoints)")
    p.add_argument("--out", required=True, help="router file to write (safetensors)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--num-experts", type=int, help="experts of the router (default: one per "
                   "modality; more splits each modality into sub-domains by k-means on its "
                   "features, fewer groups the closest modalities: router/domains.py)")
    args = p.parse_args(argv)

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.data.tokenizer import Tokenizer
    from medmoe_mcore.router import file as router_file
    from medmoe_mcore.router.training import RouterRecipe, train_from_checkpoint
    from medmoe_mcore.runtime import parallel

    folder = store.resolve(args.load)
    tok_dir = Path(args.tokenizer or folder / store.TOKENIZER)
    if not tok_dir.exists():
        print(f"error: no tokenizer: {tok_dir} does not exist (pass --tokenizer)",
              file=sys.stderr)
        return 2
    parallel.initialize(ParallelConfig(), seed=RouterRecipe().seed)
    try:
        router, report, skipped = train_from_checkpoint(folder, _records(args), Tokenizer(tok_dir),
                                                        args.num_experts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(f"skipped records: {dict(skipped)}")
    for name, acc in report["per_class"].items():
        print(f"  {name:>16}: held-out accuracy {acc:.3f}")
    print(f"router held-out accuracy {report['accuracy']:.3f} (chance "
          f"{1 / len(report['experts']):.3f}; modality accuracy "
          f"{report['modality_accuracy']:.3f}), silhouette {report['silhouette']:.3f}, train "
          f"{report['train']} / held-out {report['held_out']}")
    router_file.save(router, args.out)
    print(f"router file: {args.out} (experts = {report['experts']}; modality -> experts "
          f"{report['domains']})")
    print(json.dumps({k: report[k] for k in ("accuracy", "modality_accuracy", "silhouette",
                                             "modalities", "experts", "domains")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
