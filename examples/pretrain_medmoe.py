"""Med-MoE training on Megatron-Core: one stage, or (no arguments) the whole demo pipeline.

    # the embedded demo: stage 1 -> stage 2 -> router -> upcycling -> stage 3 (tiny, CPU)
    torchrun --nproc_per_node 2 examples/pretrain_medmoe.py

    # one stage on your data (Megatron-LM flag names)
    torchrun --nproc_per_node 8 examples/pretrain_medmoe.py --stage 2 \\
        --pretrained-checkpoint CKPT_STAGE1 --data-path SHARDS --tokenizer TOK \\
        --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 128 \\
        --lr 2e-5 --min-lr 0 --lr-warmup-fraction 0.03 --train-iters 1400 --seq-length 2048 \\
        --save CKPT_STAGE2 --save-interval 200 --bf16 --tensorboard-dir TB

`--load DIR` resumes exactly when DIR holds a checkpoint of this run (model, optimizer,
scheduler, RNG, data position); `--pretrained-checkpoint` starts a stage from weights only.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def arguments(argv=None):
    from tools.upcycle_to_moe import moe_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("stage")
    g.add_argument("--stage", type=int, choices=[1, 2, 3],
                   help="train one stage (default: the whole demo pipeline)")
    g.add_argument("--data-path", help="webdataset shards (tools/prepare_data.py)")
    g.add_argument("--tokenizer", help="HF tokenizer folder or sentencepiece .model "
                                       "(default: the checkpoint's tokenizer/)")
    g.add_argument("--template", choices=["plain", "phi", "stablelm"])
    g.add_argument("--flavor", default="tiny", help="model flavor of the demo pipeline")
    g.add_argument("--work-dir", default="medmoe_demo", help="demo pipeline outputs")
    g.add_argument("--router", help="router file (stage 3 upcycling)")
    g = p.add_argument_group("Megatron-LM")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--pretrained-checkpoint")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-interval", type=int)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g = p.add_argument_group("Med-MoE (stage-3 upcycling in the pipeline)")
    moe_arguments(g)
    return p.parse_args(argv)


def parallel_config(args):
    from medmoe_mcore.config import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          sequence_parallel=args.sequence_parallel,
                          expert_model_parallel_size=args.expert_model_parallel_size)


def train_stage(args, stage, data_path, start, save, lr, iters, tokenizer=None):
    """One stage; returns the per-iteration losses."""
    from medmoe_mcore import checkpointing
    from medmoe_mcore.training.trainer import Trainer, TrainConfig

    source = args.load if args.load and _is_checkpoint(args.load) else start
    cfg = checkpointing.read_config(source, parallel_config(args))
    if args.bf16:
        cfg.params_dtype = "bfloat16"
    cfg.recompute_granularity = args.recompute_granularity
    tokenizer = tokenizer or args.tokenizer or str(checkpointing.resolve(source) /
                                                   checkpointing.TOKENIZER)
    train = TrainConfig(
        stage=stage, data_path=data_path, tokenizer=tokenizer, train_iters=iters,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, lr=lr, min_lr=args.min_lr,
        lr_warmup_fraction=args.lr_warmup_fraction, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, seed=args.seed, template=args.template, save=save,
        load=args.load, pretrained_checkpoint=start, save_interval=args.save_interval,
        log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
        use_distributed_optimizer=args.use_distributed_optimizer,
        exit_interval=args.exit_interval)
    return Trainer(cfg, train).run()


def _is_checkpoint(path):
    from medmoe_mcore import checkpointing

    try:
        checkpointing.resolve(path)
        return True
    except FileNotFoundError:
        return False


def pipeline(args):
    """The embedded demo, end to end, on the demo data and the `tiny` flavor."""
    import torch.distributed as dist

    from medmoe_mcore import checkpointing
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.config import ModelConfig, ParallelConfig
    from medmoe_mcore.data import demo
    from medmoe_mcore.data.tokenizer import Tokenizer, train_sentencepiece
    from medmoe_mcore.flavors import language_flavor, vision_flavor
    from medmoe_mcore.models.medmoe import MedMoEModel
    from medmoe_mcore.training.trainer import log

    begin = time.time()
    work = Path(args.work_dir)
    parallel.initialize(ParallelConfig(), seed=args.seed)
    if dist.get_rank() == 0:  # data and tokenizer once, then everyone reads them
        demo.build(work / "data")
        if not (work / "tokenizer" / "tokenizer.model").exists():
            train_sentencepiece(demo.corpus(work / "data"), work / "tokenizer")
    dist.barrier()
    shards = demo.build(work / "data", show_progress=False)
    tok = Tokenizer(work / "tokenizer")
    log(f"demo data in {work / 'data'}; tokenizer: {tok.vocab_size} pieces, <image> = "
        f"{tok.image_token_id}")

    lm = language_flavor(args.flavor)
    cfg = ModelConfig(language=lm, vision=vision_flavor(args.flavor, tok.image_token_id))
    init = work / "checkpoints" / "init"
    if not _is_checkpoint(init):  # a random tiny model stands in for CLIP + Phi-2
        model = MedMoEModel(cfg)
        checkpointing.save(model.sharded_state_dict(), init, cfg,
                           extra_dirs={checkpointing.TOKENIZER: work / "tokenizer"})
    args.load = None  # the pipeline's stages start from the previous stage's weights
    iters = args.train_iters or 200
    summary = {}
    ck = work / "checkpoints"
    for stage, data, start, lr in ((1, shards["stage1"], init, args.lr or 1e-3),
                                   (2, shards["stage2"], ck / "stage1", args.lr or 1e-3)):
        log(f"\n=== stage {stage} ===")
        losses = train_stage(args, stage, str(data), str(start), str(ck / f"stage{stage}"), lr,
                             iters)
        summary[f"stage{stage}"] = (losses[0], losses[-1])
        log(f"stage {stage}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    log("\n=== router ===")
    accuracy = train_router(ck / "stage2", shards["router"], work / "router.safetensors", args)
    summary["router accuracy"] = accuracy

    log("\n=== upcycling ===")
    from medmoe_mcore.conversion.upcycle import upcycle
    from tools.upcycle_to_moe import moe_config

    moe = moe_config(args, learned=False)
    upcycle(ck / "stage2", ck / "stage3_init", moe, router_path=work / "router.safetensors")
    log(f"upcycled {ck / 'stage2'} -> {ck / 'stage3_init'}: {moe.num_experts} experts, top-"
        f"{moe.router_topk}, meta expert")

    log("\n=== stage 3 ===")
    losses = train_stage(args, 3, str(shards["stage3"]), str(ck / "stage3_init"),
                         str(ck / "stage3"), args.lr or 1e-3, iters)
    summary["stage3"] = (losses[0], losses[-1])
    log(f"stage 3: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    log("\n=== summary ===")
    for stage in ("stage1", "stage2", "stage3"):
        first, last = summary[stage]
        log(f"{stage}: loss {first:.4f} -> {last:.4f} ({'falls' if last < first else 'DOES NOT FALL'})")
    log(f"router held-out accuracy: {accuracy:.3f} (chance {1 / 4:.3f})")
    log(f"checkpoints: {ck}/stage1, stage2, stage3_init, stage3; router: "
        f"{work / 'router.safetensors'}")
    log(f"total time: {time.time() - begin:.0f} s")
    log(json.dumps({"stage1": summary["stage1"], "stage2": summary["stage2"],
                    "stage3": summary["stage3"], "router_accuracy": accuracy}))


def train_router(stage2, router_shards, out, args) -> float:
    """Fit the modality router on stage-2 features (80/20 split); returns held-out accuracy."""
    import torch
    import torch.distributed as dist

    from medmoe_mcore import checkpointing
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.router import file as router_file
    from medmoe_mcore.config import ParallelConfig
    from medmoe_mcore.data.loader import EncodedDataset
    from medmoe_mcore.models.medmoe import MedMoEModel
    from medmoe_mcore.router.training import evaluate, fit_router, pooled_multimodal_features
    from medmoe_mcore.training.trainer import log

    parallel.initialize(ParallelConfig(), seed=args.seed)
    cfg = checkpointing.read_config(stage2, ParallelConfig())
    model = MedMoEModel(cfg)
    checkpointing.load_into(model, stage2)
    data = EncodedDataset(router_shards, str(checkpointing.resolve(stage2) / "tokenizer"),
                          "phi", args.seq_length, cfg)
    from medmoe_mcore.data.records import read_shards, shard_paths

    modalities = [r.get("modality") for r, _ in read_shards(shard_paths(router_shards))]
    names = sorted(set(modalities))
    labels = torch.tensor([names.index(m) for m in modalities])
    features = pooled_multimodal_features(model, (data.collate([i]) for i in range(len(data))))
    split = int(0.8 * len(features))
    router = fit_router(features[:split], labels[:split], names, epochs=200, lr=1e-2)
    result = evaluate(router, features[split:], labels[split:])
    if dist.get_rank() == 0:
        router_file.save(router, out)
    dist.barrier()
    log(f"router: {len(names)} modalities {names}; held-out accuracy {result['accuracy']:.3f} "
        f"per class {json.dumps({k: round(v, 3) for k, v in result['per_class'].items()})}")
    return result["accuracy"]


def main(argv=None):
    args = arguments(argv)
    if args.stage is None:
        pipeline(args)
        return 0
    if not args.data_path or not (args.load or args.pretrained_checkpoint) or not args.lr \
            or not args.train_iters:
        raise SystemExit("--stage needs --data-path, --load or --pretrained-checkpoint, --lr "
                         "and --train-iters")
    losses = train_stage(args, args.stage, args.data_path, args.pretrained_checkpoint,
                         args.save, args.lr, args.train_iters)
    from medmoe_mcore.training.trainer import log

    log(json.dumps({"losses": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
